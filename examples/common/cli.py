"""Command-line flags shared by the GPT and BERT training scripts."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """Takes a size such as ``"512MiB"``, ``"2GB"`` or ``"1000000"``; returns bytes.

    Raises ``argparse.ArgumentTypeError`` (reported by argparse) for anything else.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; write e.g. 512MiB, 2GB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def training_parser(description: str, sizes: list[str]) -> argparse.ArgumentParser:
    """Takes the script's description and its named model sizes; returns the shared parser.

    Model-shape flags left unset keep the named size's value.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=["own", "hf"], default="own",
                   help="the project's own model, or the Hugging Face one built from a config (no download)")
    m.add_argument("--size", choices=sizes, default="tiny", help="named model size")
    m.add_argument("--layers", type=int, default=None, help="number of layers (overrides --size)")
    m.add_argument("--hidden", type=int, default=None, help="hidden size (overrides --size)")
    m.add_argument("--heads", type=int, default=None, help="attention heads (overrides --size)")
    m.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the size's, at most 128)")
    m.add_argument("--vocab", type=int, default=None, help="vocabulary size (overrides --size)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps to run (in total, when resuming)")
    t.add_argument("--batch-size", type=int, default=16, help="global batch size (split across ranks)")
    t.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    t.add_argument("--warmup", type=int, default=20,
                   help="steps of linear learning-rate warm-up to --lr")
    t.add_argument("--clip", type=float, default=1.0, help="clip the gradients' global norm to this (0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation, data and shuffling")
    t.add_argument("--docs", type=int, default=2000, help="documents in the generated corpus")
    t.add_argument("--save", default=None, help="write a checkpoint to this folder at the end")
    t.add_argument("--resume", default=None, help="resume from a checkpoint folder written by --save")
    t.add_argument("--out", default=None, help="folder for the pictures, loss log and summary (default out/<script>)")
    t.add_argument("--eager", action="store_true",
                   help="train with plain PyTorch on one process (the reference rannc_py must match)")
    r = p.add_argument_group("rannc_py")
    r.add_argument("--plan", default=None,
                   help="plan JSON: reused when the file exists, otherwise the new plan is saved there")
    r.add_argument("--cluster", default=None,
                   help="plan for this cluster preset, e.g. a64fx:nodes=4 (its device count must equal the "
                        "ranks), and run that plan here (default: this machine, local:ranks=<ranks>)")
    r.add_argument("--stages", type=int, default=None,
                   help="pin the pipeline depth; the planner still places the cuts and replicas")
    r.add_argument("--microbatches", type=int, default=None, help="pin the microbatches per step")
    r.add_argument("--memory-limit", type=parse_bytes, default=None,
                   help="memory per rank the plan must fit, e.g. 64MiB; small values force pipeline stages")
    r.add_argument("--trace", default=None, metavar="FILE.json",
                   help="record the measured timeline of --trace-steps steps (after the first) into this "
                        "trace-event JSON (open it in Perfetto or chrome://tracing), with a PNG of it above the "
                        "predicted timeline beside it")
    r.add_argument("--trace-steps", type=int, default=3, help="steps to record with --trace")
    return p
