"""bench/gpu_check.py, the one command a GPU's first hour runs, in the mode a CPU can run. The GPU run drives
prepare.py, train.py (alone and under torchrun), sample.py, eval.py and serve.py through their flags and reads
what they print and log; here every check prints its line, in order, and each one a CPU can run passes at tiny
sizes, so a renamed flag or a changed output format fails here before a GPU hour is spent on it."""
import os
import re
import subprocess
import sys

from conftest import ENV, ROOT

GPU_CHECK = os.path.join(ROOT, "bench", "gpu_check.py")
CHECKS = ["data", "sdpa", "grad_checkpoint", "train_speed", "train_fp16", "sample", "eval", "eval_scores", "serve",
          "ddp", "fsdp", "quantized"]
LINE = re.compile(r"^(\w+) +(PASS|FAIL|SKIP)  (.*) \[\d+ s\]$", re.M)  # name, result, figure or reason, seconds


def gpu_check(work, *args):
    p = subprocess.run([sys.executable, GPU_CHECK, "--device=cpu", "--quick=True", f"--work={work}", *args],
                       cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    lines = {m.group(1): (m.group(2), m.group(3)) for m in LINE.finditer(p.stdout)}
    assert list(lines) == CHECKS, p.stdout + p.stderr[-3000:]
    return p, {k: v[0] for k, v in lines.items()}, {k: v[1] for k, v in lines.items()}


def test_cpu_mode_passes_every_check_a_cpu_can_run(tmp_path):
    p, result, said = gpu_check(tmp_path)
    assert result == {**{k: "PASS" for k in CHECKS}, "grad_checkpoint": "SKIP"}, p.stdout
    assert p.returncode == 0 and "12 of 12 checks passed or skipped, 0 failed" in p.stdout
    assert "CUDA's allocator" in said["grad_checkpoint"]  # a skip says why
    # what each line reports, read from the scripts' own output and files
    assert re.match(r"prepare.py --dataset=stdlib: [\d,]+ train \+ [\d,]+ val tokens, 512-token BPE$", said["data"])
    assert said["sdpa"].startswith("flash: the model's forward ran aten::_scaled_dot_product_flash_attention_for_cpu")
    assert re.match(r"[\d,]+ tokens/s \([\d,]+ parameters, float32, eager, \d+ ms/step; no MFU", said["train_speed"])
    first, last = map(float, re.match(r"loss (\S+) at step 10 -> (\S+) at 60", said["train_fp16"]).groups())
    assert last < first and re.search(r"GradScaler scale \d", said["train_fp16"])
    for script in ("sample", "eval", "serve"):  # greedy text through each script equals decode.generate's
        assert said[script].startswith("float32 on cpu: equal to decode.generate on the CPU (48 tokens)")
    assert re.match(r"bfloat16 vs float32 on cpu: nats_per_token [\d.]+ [+-]\d\.\de-\d\d, bits_per_byte",
                    said["eval_scores"])
    for mode in ("ddp", "fsdp"):
        assert re.match(rf"torchrun --nproc_per_node=1 --parallel={mode}: 20 steps, loss [\d.]+, val [\d.]+",
                        said[mode])


def test_a_failed_check_fails_the_command_and_skips_what_needs_it(tmp_path):
    (tmp_path / "data").write_text("a file where prepare.py makes its folder")
    p, result, said = gpu_check(tmp_path)
    assert p.returncode == 1 and "1 failed" in p.stdout.splitlines()[-1]
    assert result["data"] == "FAIL" and said["data"].startswith("prepare.py exited 1: error: ")
    assert result["sdpa"] == "PASS"  # needs no data
    for name in CHECKS[3:]:  # every check that trains or reads a run needs the data, and says so
        assert result[name] == "SKIP" and said[name].startswith("needs data, which failed: prepare.py exited 1"), name
