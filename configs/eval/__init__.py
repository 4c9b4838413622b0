"""Zero-shot segmentation eval configs: the keys every one of them has, and the prompt templates.

  python -m mixreorg_jax.evaluate --config=configs/eval/<dataset>.py --checkpoint=DIR --config.data.root=PATH

A train config declares its evaluations as `config.evals.<name>`, each one of these configs with its period
(`every_steps`); `python -m mixreorg_jax.evaluate` runs an eval config, or every evaluation of a config with evals.
Every protocol choice is a key here (GroupViT#56/#50 came from hidden ones), and evaluate prints them with the
results. A config's `get_config(arg)` takes comma-separated options: a template set (simple, subset, full), and
where a config says so, others (e.g. `configs/eval/ade20k.py:tfds,full`).
"""
import ml_collections

# The 80 CLIP ImageNet prompts (Radford et al. 2021).
FULL_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.")
assert len(FULL_TEMPLATES) == 80
# The 7-prompt subset CLIP's notebook selected; GroupViT calls it "subset".
SUBSET_TEMPLATES = ("itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
                    "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
# GroupViT's segmentation eval default (configs/default.yml: evaluate.seg.template = simple).
SIMPLE_TEMPLATES = ("a photo of a {}.",)
TEMPLATES = {"simple": SIMPLE_TEMPLATES, "subset": SUBSET_TEMPLATES, "full": FULL_TEMPLATES}


def parse_arg(arg, allowed=()):
  """Splits `arg` ("full,tfds") into (template set, other options); unknown options are an error."""
  options = [a.strip() for a in (arg or "").split(",") if a.strip()]
  templates = [o for o in options if o in TEMPLATES]
  others = [o for o in options if o not in TEMPLATES]
  unknown = [o for o in others if o not in allowed]
  if unknown or len(templates) > 1:
    raise ValueError(f"eval config option {arg!r}: expected at most one of {sorted(TEMPLATES)}"
                     f"{' and any of ' + str(sorted(allowed)) if allowed else ''}.")
  return (templates[0] if templates else "simple"), set(others)


def base_config(name, class_names, bg_threshold, with_background=True, templates="simple", split="val"):
  """The keys every eval config has (locked: a mistyped `--config.key` is an error).

  bg_threshold: a pixel whose best class probability is below it is background (needs with_background).
  """
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.name = name
  c.data.root = ""  # the dataset folder; see mixreorg_jax/data/seg_datasets.py for each layout.
  c.data.split = split
  c.data.max_images = 0  # > 0: only the first N images (quick runs).
  c.class_names = tuple(class_names)  # the names put into the prompts, in label-id order; () = the dataset's.
  c.prompt_templates = TEMPLATES[templates]  # the class text embedding is averaged over these.
  c.with_background = with_background  # label 0 is a background class, decided by bg_threshold.
  c.bg_threshold = bg_threshold if with_background else -1.0  # -1 = no background thresholding.
  c.top_k_classes = 5  # only the k classes with the highest image-level affinity can be predicted (GroupViT).
  c.short_side = 448  # the image is resized so its short side is this ...
  c.window = 448  # ... and segmented in sliding windows of this size ...
  c.stride = 224  # ... at this stride; the window logits are averaged.
  c.batch_size = 8  # windows per jitted forward.
  c.save_predictions = ""  # a folder: palette PNG predictions, named like the ground-truth files.
  c.output_dir = ""  # "" = <checkpoint>/eval/<data.name>/ (metrics.json, TensorBoard, overlays).
  c.num_visualizations = 8  # overlay PNGs of the first N images in output_dir (at the end of training).
  # Options of the evaluation (mixreorg_jax/evaluator.py), and when it runs in a train config's config.evals:
  c.every_steps = 0  # > 0: also every N training steps; every evaluation runs at the end of training.
  c.synthetic = ""  # with data.root "": the built-in synthetic set of this name (config.input.synthetic_dir/NAME).
  c.sweep_bg_thresholds = False  # also the mIoU at each bg threshold 0, 0.05, ..., 1, and the best one.
  c.bg_threshold_from = ""  # the name of an evaluation with sweep_bg_thresholds: this one also at its best one.
  c.baselines = False  # at the end: chance (random groups) and untrained-model mIoU of the same protocol.
  c.image_recognition = False  # at the end: image-level zero-shot top-1 (and its chance).
  return c
