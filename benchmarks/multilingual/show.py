"""Print explore.py JSONL results as a compact table: ``python show.py results.jsonl``."""

from __future__ import annotations

import json
import sys


def main() -> None:
    for path in sys.argv[1:]:
        for line in open(path):
            r = json.loads(line)
            if "setting" not in r:
                print(line.strip())
                continue
            s = r["setting"]
            t = r["time"]
            f = ""
            if "forget_after" in r:
                b, a = r["forget_before"], r["forget_after"]
                f = (
                    f" lid_loss {b['lid_loss']:.3f}->{a['lid_loss']:.3f}"
                    f" lid_acc {b['lid_acc']:.3f}->{a['lid_acc']:.3f} drift {a['drift']:.3f}"
                )
            print(
                f"{s['init']:10s} k={s['frozen_layers']:2d} n={s['n']} steps={s['steps']} "
                f"lr={s['lr']:.0e} bs={s['batch_size']} seed={s['seed']} "
                f"langs={','.join(s['train_langs'])}|{','.join(s['zero_shot_langs'])} "
                f"test {r['test']:.3f} zs {r['zero_shot']:.3f} "
                f"[{t['ms_per_step']:.0f} ms/step, train {t['train_s']:.1f}s, "
                f"total {t.get('total_s', float('nan')):.1f}s]{f}"
            )


if __name__ == "__main__":
    main()
