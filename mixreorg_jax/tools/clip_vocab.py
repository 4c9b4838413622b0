"""Puts CLIP's BPE vocab (bpe_simple_vocab_16e6.txt.gz) into the local cache the clip_bpe tokenizer defaults to.

  python -m mixreorg_jax.tools.clip_vocab [--wheel=open_clip_torch-*.whl] [--out=PATH]

The file ships inside the open_clip_torch wheel on PyPI; `pip download --no-deps` fetches the wheel alone (no
torch), and the vocab is read out of it. Run once on a machine with PyPI access, or pass a wheel you already
have. The default destination is mixreorg_jax.data.tokenizers.DEFAULT_CLIP_VOCAB ($MIXREORG_CACHE or
~/.cache/mixreorg_jax).
"""
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

from absl import app
from absl import flags

from mixreorg_jax.data import tokenizers

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
MEMBER = "open_clip/" + tokenizers.CLIP_VOCAB_NAME


def extract_vocab(wheel: str, out: str) -> str:
  """Copies open_clip/bpe_simple_vocab_16e6.txt.gz out of an open_clip_torch wheel to `out`."""
  with zipfile.ZipFile(wheel) as z:
    data = z.read(MEMBER)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, out)  # atomic: a half-written vocab is never picked up
  return out


def ensure_clip_vocab(out: str = tokenizers.DEFAULT_CLIP_VOCAB, wheel: str = "") -> str:
  """Returns the path of the cached vocab, downloading the open_clip_torch wheel (no deps) if needed."""
  if os.path.exists(out):
    return out
  if wheel:
    return extract_vocab(wheel, out)
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", OPEN_CLIP_WHEEL, "-d", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = glob.glob(os.path.join(tmp, "open_clip_torch-*.whl"))
    if result.returncode or not wheels:
      raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.stderr.strip()[-500:]}); download the wheel elsewhere "
                         "and pass --wheel, or set config.input.tokenizer_path to the vocab file.")
    return extract_vocab(wheels[0], out)


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string("wheel", "", "An open_clip_torch wheel already on disk.")
  flags.DEFINE_string("out", tokenizers.DEFAULT_CLIP_VOCAB, "Where the vocab goes.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(ensure_clip_vocab(flags.FLAGS.out, flags.FLAGS.wheel))


if __name__ == "__main__":
  define_flags()
  app.run(main)
