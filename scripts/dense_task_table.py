"""The README's dense-task table from scripts/dense_task.py's RESULTS.json: top-1 and patch-level foreground IoU of
dense, each method off the shelf (with its random-score control) and after its short fine-tune; where the JSON has
it, the share of the tokens each selecting block runs that lie on the object (off the shelf).
Usage: python scripts/dense_task_table.py OUT/RESULTS.json"""
import json
import sys


def main(path: str) -> None:
    results = json.load(open(path))
    shelf, tuned = results["off_the_shelf"], results["fine_tuned"]
    shares = any("object_share" in row for row in shelf.values())
    head = "| configuration | off the shelf: top-1 | IoU | fine-tuned: top-1 | IoU | its weights run dense: top-1 |"
    print(head + (" run tokens on the object, per selecting block (%) |" if shares else ""))
    print("|---" * (head.count("|") - 1 + shares) + "|")
    for name, row in shelf.items():
        after = tuned.get(name)
        cells = ["-", "-", "-"] if after is None else [f"{after['top1']:.2f}", f"{after['iou']:.2f}",
                                                       f"{after['dense_top1']:.2f}"]
        if shares:
            share = row.get("object_share", {})
            cells.append(", ".join(f"{block}: {s:.0f}" for block, s in share.items()) or "-")
        shown = name.replace(" score=random", ", control: random scores").replace(" score=norm", ", feature norm")
        print(f"| {shown} | {row['top1']:.2f} | {row['iou']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
