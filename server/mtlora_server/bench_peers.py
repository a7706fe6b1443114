"""Peer rows of `mtlora-bench engine`: vLLM's CPU build, run as an external process on the same model, prompts,
adapters and dtype as the engine rows, in the same sitting.

Contract:
- `VLLM_ROWS`: the vLLM rows (bare base compiled, bare base eager, 4 plain LoRA adapters mixed through vLLM's own
  multi-LoRA serving: `enable_lora`, `max_loras` 4, one `LoRARequest` per prompt, round-robin).
- `write_lora4(root, hf_config, seed) -> {name: dir}`: the 4 plain LoRA adapters (q, k, v, o; r = 16, alpha 32;
  random non-zero weights, seeded) as PEFT LoRA directories (`mtlora.peft_format.write_peft_lora`), which both
  our engine and vLLM load.
- `find_vllm(flag, scripts) -> VllmSetup`: the interpreter (`--vllm-python`, else $MTLORA_VLLM_PYTHON, else
  ~/.cache/mtlora-peers/vllm-cpu/bin/python, as `.ci/run` and `vllm_cpu_baseline.sh` build it) and the peer
  script `vllm_multilora_bench.py` (`--peer-scripts`, else $MTLORA_PEER_SCRIPTS, else `../shared/peers` beside the
  repository). `setup.problem` is None when vLLM imports in that interpreter, else why not.
- `run_vllm_row(setup, row, ...) -> dict`: the row's summary (`bench_engine.summarize` form: median run by
  seconds, every run's seconds) or `{"not_run": reason}`; never raises for a missing or failing vLLM. vLLM's
  stderr, then its stdout, go to `log_path` (the last stderr line is quoted in the reason when it fails).

The peer script draws its prompts exactly as `bench_engine.make_prompts` does (`random.Random(seed + 1 + round)`,
`randrange(10, vocab)` per token, vocab = the tokenizer's `vocab_size`), so passing the engine row's prompt seed
gives vLLM the same prompts round by round. Scripts in ../shared/peers are called, never copied.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mtlora.bench_peers")

PEERS_ROOT = Path(os.environ.get("MTLORA_PEERS_DIR", Path.home() / ".cache" / "mtlora-peers"))
DEFAULT_VLLM_PYTHON = PEERS_ROOT / "vllm-cpu" / "bin" / "python"
DEFAULT_SCRIPTS = Path(__file__).resolve().parents[2].parent / "shared" / "peers"
SCRIPT = "vllm_multilora_bench.py"
LORA4_RANK = 16
LORA4_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class VllmRow:
    """One vLLM row: which engine row's prompts it reuses, compiled or eager, with the 4 LoRA adapters or bare."""

    name: str
    prompts_of: str
    eager: bool
    lora: bool
    what: str


VLLM_ROWS = {r.name: r for r in (
    VllmRow("vllm_base", "engine_base", eager=False, lora=False, what="vLLM CPU, compiled (its default), bare base"),
    VllmRow("vllm_base_eager", "engine_base", eager=True, lora=False, what="vLLM CPU, --enforce-eager, bare base"),
    VllmRow("vllm_lora4", "engine_lora4", eager=False, lora=True,
            what="vLLM CPU multi-LoRA (enable_lora, max_loras 4), the 4 LoRA adapters mixed"),
)}


@dataclass
class VllmSetup:
    python: Path
    script: Path
    problem: str | None           # None: vLLM imports in `python` and the script exists


def write_lora4(root: Path, hf_config, seed: int) -> dict[str, str]:
    """4 plain LoRA adapters on q, k, v, o (r = 16, alpha 32), random weights, as PEFT LoRA directories."""
    from mtlora.config import AdapterConfig
    from mtlora.peft_format import write_peft_lora
    from mtlora.reference import random_adapter_tensors

    cfg = AdapterConfig(method="lora", rank=LORA4_RANK, alpha=2.0 * LORA4_RANK, target_modules=LORA4_MODULES)
    return {f"lora{i}": str(write_peft_lora(root / f"peft_lora{i}", cfg,
                                            random_adapter_tensors(cfg, hf_config, seed=seed + 100 + i, scale=0.02)))
            for i in range(4)}


def find_vllm(flag: str | None, scripts: str | None) -> VllmSetup:
    """Where vLLM and the peer script are, and whether they can run (never raises)."""
    env = os.environ.get("MTLORA_VLLM_PYTHON")
    python = Path(flag or env or DEFAULT_VLLM_PYTHON).expanduser()
    where = "--vllm-python" if flag else "$MTLORA_VLLM_PYTHON" if env else "the default venv"
    script = Path(scripts or os.environ.get("MTLORA_PEER_SCRIPTS") or DEFAULT_SCRIPTS).expanduser() / SCRIPT
    if not (python.is_file() and os.access(python, os.X_OK)):
        return VllmSetup(python, script, f"no vLLM interpreter at {python} ({where}); build it as .ci/run does "
                         "(MTLORA_CI_PEERS=1) or pass --vllm-python")
    if not script.is_file():
        return VllmSetup(python, script, f"peer script {script} not found (--peer-scripts / $MTLORA_PEER_SCRIPTS)")
    try:
        probe = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                               text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return VllmSetup(python, script, f"{python} ({where}) cannot import vllm: {exc}")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return VllmSetup(python, script, f"{python} ({where}) cannot import vllm: {last}")
    log.info("vLLM %s at %s", probe.stdout.strip(), python)
    return VllmSetup(python, script, None)


def vllm_command(setup: VllmSetup, row: VllmRow, model_dir, lora_dirs: list[str], args, seed: int) -> list[str]:
    cmd = [str(setup.python), str(setup.script), str(model_dir), *(lora_dirs if row.lora else []),
           "--num-prompts", str(args.num_prompts), "--prompt-len", str(args.input_len),
           "--new-tokens", str(args.output_len), "--dtype", args.dtype, "--rounds", str(args.repeats),
           "--max-lora-rank", str(LORA4_RANK), "--seed", str(seed)]
    return cmd + (["--eager"] if row.eager else [])


def vllm_env(threads: int | None) -> dict[str, str]:
    """The environment `vllm_cpu_baseline.sh` sets: all cores for OpenMP, a 2 GiB KV cache, the shared cache."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CACHE_ROOT", str(PEERS_ROOT / "vllm-cache"))
    return env


def parse_results(stdout: str) -> tuple[list[dict], dict | None]:
    """(per-round RESULT dicts, the final summary dict or None) from the peer script's stdout."""
    rounds, final = [], None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT "):])
            if "round" in data:
                rounds.append(data)
            elif "median_gen_tok_s" in data:
                final = data
    return rounds, final


def run_vllm_row(setup: VllmSetup, row: VllmRow, model_dir, lora_dirs: list[str], args, seed: int,
                 log_path: Path, timeout: float) -> dict:
    """Run one vLLM row in its own process; its summary, or {"not_run": reason}."""
    from .bench_engine import summarize

    if setup.problem:
        return {"not_run": setup.problem}
    cmd = vllm_command(setup, row, model_dir, lora_dirs, args, seed)
    log.info("%s: starting vLLM (start-up takes 20-80 s; its log: %s)", row.name, log_path)
    try:
        with open(log_path, "w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                                  env=vllm_env(args.threads))
    except subprocess.TimeoutExpired:
        return {"not_run": f"vLLM did not finish within {timeout:.0f} s (--vllm-timeout); log {log_path}"}
    tail = _tail(log_path)                                 # the last stderr line, before stdout joins the log
    with open(log_path, "a") as f:                         # vLLM logs to stdout too: keep it with its stderr
        f.write("\n--- stdout ---\n" + proc.stdout)
    rounds, final = parse_results(proc.stdout)
    if proc.returncode != 0 or final is None or len(rounds) != args.repeats:
        return {"not_run": f"vLLM exited with code {proc.returncode} after {len(rounds)} of {args.repeats} "
                           f"rounds: {tail} (log {log_path})"}
    want = args.num_prompts * args.output_len           # the script forces min_tokens = max_tokens, ignores EOS
    for r in rounds:      # its figures are rounded (0.1 tok/s, 0.01 s): allow for that, catch short outputs
        if abs(r["gen_tok_s"] * r["seconds"] - want) > 0.06 * r["seconds"] + 0.006 * r["gen_tok_s"] + 1:
            return {"not_run": f"vLLM generated {r['gen_tok_s'] * r['seconds']:.0f} tokens in round {r['round']}, "
                               f"expected {want}"}
    runs = [{"seconds": r["seconds"], "output_tokens": want, "loadavg": r.get("loadavg")} for r in rounds]
    for r in runs:
        log.info("%s: %.1f s, %.1f tok/s", row.name, r["seconds"], r["output_tokens"] / r["seconds"])
    return {**summarize(runs), "init_s": final.get("init_s"), "vllm_median_tok_s": final["median_gen_tok_s"],
            "command": " ".join(cmd)}


def _tail(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output on stderr"


if __name__ == "__main__":                        # `python -m mtlora_server.bench_peers`: where vLLM is and if it runs
    logging.basicConfig(level=logging.INFO)
    s = find_vllm(None, None)
    print(f"python {s.python}\nscript {s.script}\n{'ok' if s.problem is None else 'not usable: ' + s.problem}")
    sys.exit(0 if s.problem is None else 1)
