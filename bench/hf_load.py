"""Loading a sparse Hugging Face checkpoint: time and peak memory, skeleton on meta vs dense first.

    python bench/hf_load.py [--out DIR]     # CPU is enough; ~1 min, ~4 GB of RAM

Saves a Llama-shaped model (0.62 B dense parameters, bf16, every Linear but the LM head 90%
block-sparse at 64x64), then loads it in fresh processes two ways and prints one CSV row each:
``meta`` is ``sparsecore.hf.from_pretrained(..., dtype=torch.bfloat16)`` (parameters built on
the meta device, the file's tensors assigned; the dtype casts the RoPE table ``inv_freq``, which
is computed, not stored, as ``.to(torch.bfloat16)`` did to the saved model), ``dense-first`` builds the dense model (random init) and loads into it.
Both must give logits bitwise equal to the saved model's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)

LOAD = """
import sys, time, torch
import sparsecore.hf as schf, sparsecore.io as scio
from transformers import AutoConfig, AutoModelForCausalLM
how, d = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if how == "meta":
    m = schf.from_pretrained(AutoModelForCausalLM, d, dtype=torch.bfloat16)
else:
    cfg = AutoConfig.from_pretrained(d)
    m = scio.load(lambda: AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), d + "/sparsecore.safetensors")
t = time.perf_counter() - t0
with torch.no_grad():
    y = m(input_ids=torch.load(d + "/ids.pt")).logits
# peak RSS of this process (ru_maxrss would include the parent's, kept across exec)
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 2**20
print(f"{how},{t:.2f},{rss:.2f},{torch.equal(y, torch.load(d + '/ref.pt'))}")
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for the checkpoint (default: a temporary one)")
    args = p.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparsecore.hf as schf

    d = Path(args.out or tempfile.mkdtemp())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16).eval()
    dense_params = sum(p.numel() for p in model.parameters())
    schf.sparsify(model, block=(64, 64), sparsity=0.9)
    schf.save_pretrained(model, d)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 16))
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, d / "ref.pt")
    torch.save(ids, d / "ids.pt")
    size = (d / schf.WEIGHTS_NAME).stat().st_size / 2**20
    del model
    print(f"# {dense_params / 1e9:.2f} B dense parameters, file {size:.0f} MiB, torch {torch.__version__}")
    print("how,load_s,peak_rss_gib,logits_equal")
    for how in ("meta", "dense-first"):
        out = subprocess.run([sys.executable, "-c", LOAD, how, str(d)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
