"""Pure tensor logic: selection, gather/scatter, scores, schedules, MAC formulas. No model classes, no timm."""
