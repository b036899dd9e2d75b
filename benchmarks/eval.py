"""The same lm-evaluation-harness generate_until task on the same base model through
gym's harness model (GymLM: gym's fused sampler, stop strings ending rows early) and
through the harness's own ``hf`` model (transformers' ``generate``), one after the
other in one process; scores must be equal, and the timings are compared.

The task is written here over a local JSONL file (no hub): ``--examples`` arithmetic
questions, "Q: ... A:" prompts, ``until: ["\\n"]``, ``max_gen_toks`` 32, greedy.
``--fewshot N`` puts N fixed worked examples before each question, as the harness's
few-shot tasks with fixed exemplars do (``fewshot_config: sampler: first_n``: gsm8k-cot,
bbh, minerva_math): every prompt then begins with the same examples, which gym's server
engine computes once (its prefix cache) and the ``hf`` model runs in every prompt.

    python benchmarks/eval.py                       # SmolLM2-135M-Instruct, 64 questions
    python benchmarks/eval.py --fewshot 5           # the same with 5 fixed examples
    python benchmarks/eval.py --model tiny --examples 8 --rounds 1   # a quick check
    python benchmarks/eval.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from gym_core.base.threads import prepare_environment

prepare_environment()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_task(folder: Path, examples: int, max_gen: int, fewshot: int = 0) -> None:
    import random

    rng = random.Random(0)
    with (folder / "add.jsonl").open("w") as fh:
        for _ in range(examples):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            fh.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)})
                     + "\n")
    shots = ""
    if fewshot:  # fixed worked examples (other numbers than the questions' draws)
        pairs = [(60 + i, 71 + 2 * i) for i in range(fewshot)]
        shots = (f"num_fewshot: {fewshot}\nfewshot_config:\n  sampler: first_n\n  samples:\n"
                 + "".join(f'    - question: "What is {a} + {b}?"\n      answer: "{a} + {b} = '
                           f'{a + b}"\n' for a, b in pairs))
    (folder / "bench_add.yaml").write_text(
        shots + "task: bench_add\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'add.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA: "\ndoc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {max_gen}\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
        # the answer's last number ("42", "42.", "12 + 30 = 42": 42)
        'filter_list:\n  - name: last_number\n    filter:\n      - function: regex\n'
        '        regex_pattern: "(-?\\\\d+)"\n        group_select: -1\n'
        '      - function: take_first\n')


def main() -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--model", default="smollm2", help="model= option of the base (smollm2, tiny)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--max-gen", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fewshot", type=int, default=0,
                   help="fixed worked examples before each question (default 0)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from lm_eval.models.huggingface import HFLM

    from gym_core.eval.harness import GymLM, evaluate_harness, task_manager
    from gym_core.model.policy import load_base
    from gym_core.plugin.startup import compose

    work = Path(tempfile.mkdtemp(prefix="gym-bench-eval-"))
    write_task(work, args.examples, args.max_gen, args.fewshot)
    manager = task_manager([str(work)], builtin=False)
    model, tok = load_base(compose([f"model={args.model}"]).model)
    folder = work / "model"
    model.save_pretrained(folder)  # the hf model loads the same weights from a folder
    tok.save_pretrained(folder)
    ours = GymLM(model=model, tokenizer=tok, batch_size=args.batch_size)
    theirs = HFLM(pretrained=str(folder), batch_size=args.batch_size, device="cpu")
    # untimed warm-up: first-use costs (building gym's C++ sampler kernels, which waits
    # for any other process building them; the harness's dataset and metric loading)
    for lm in (ours, theirs):
        evaluate_harness(lm, ["bench_add"], manager=manager, limit=2)
    times = {"gym": [], "hf": []}
    scores = {}
    for _ in range(args.rounds):
        for name, lm in (("gym", ours), ("hf", theirs)):
            t0 = time.perf_counter()
            got = evaluate_harness(lm, ["bench_add"], manager=manager)
            times[name].append(time.perf_counter() - t0)
            scores[name] = got["bench_add"]["metrics"]
    best = {k: min(v) for k, v in times.items()}
    result = {"model": args.model, "examples": args.examples, "max_gen_toks": args.max_gen,
              "fewshot": args.fewshot,
              "batch_size": args.batch_size, "seconds": times, "best": best,
              "speedup": best["hf"] / best["gym"], "scores": scores,
              "scores_equal": scores["gym"] == scores["hf"],
              "gym_engine": {k: ours.engine_stats[k] for k in (
                  "steps", "prefills", "decode_seconds", "prefill_seconds", "prefix_hits",
                  "prefix_tokens_reused")}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["scores_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
