"""Worker: verify an HF model against its Megatron conversion at several TP/PP layouts in one 4-rank job."""

import json
import os
import sys

import torch

from megatron_rgm import distributed
from megatron_rgm.convert.verify import verify_layout

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def main():
    hf, mcore, out = sys.argv[1:4]
    for tp, pp in LAYOUTS:
        report = verify_layout(hf, mcore, tp, pp, batches=2)
        if report is not None:
            torch.save(report.pop("logits"), os.path.join(out, f"logits_tp{tp}_pp{pp}.pt"))
            with open(os.path.join(out, f"verify_tp{tp}_pp{pp}.json"), "w") as f:
                json.dump(report, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
