"""`make demo` as one pipeline: tokenizer -> tokens -> MaskGIT -> samples -> sample FID.

  python -m vqjax.main --config=configs/demo_pipeline.py --workdir=runs/demo

Stages, each marked finished in DIR/<stage>:
  tokenizer     train configs/demo.py                       in DIR/tokenizer
  tokens_train  tokenize its train split                    into DIR/tokenizer/tokens_train
  tokens_val    tokenize its validation split               into DIR/tokenizer/tokens_validation
  maskgit       train configs/maskgit_imagenet.py:demo      in DIR/maskgit
  samples       --mode=sample of that MaskGIT               into DIR/maskgit/samples
  sample_eval   --mode=eval: FID/KID of the samples         DIR/maskgit/eval_<step>.json

`smoke`: the same stages with configs/demo.py:smoke and
configs/maskgit_imagenet.py:smoke (a few CPU steps each).
"""

from vqjax.train.pipeline import pipeline_config, stage


def get_config(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown variant {arg!r} for demo_pipeline.py; use '' or 'smoke'")
  tokenizer = "configs/demo.py:smoke" if arg == "smoke" else "configs/demo.py"
  maskgit = f"configs/maskgit_imagenet.py:{'smoke' if arg == 'smoke' else 'demo'}"
  on_tokens = {"tokenizer.config": tokenizer, "tokenizer.workdir": "{tokenizer}",
               "tokens.dir": "{tokenizer}/tokens_train",
               "tokens.val_dir": "{tokenizer}/tokens_validation"}
  return pipeline_config(
      stage("tokenizer", tokenizer),
      stage("tokens_train", tokenizer, mode="tokenize", workdir="{tokenizer}"),
      stage("tokens_val", tokenizer, mode="tokenize", workdir="{tokenizer}",
            overrides={"tokenize.split": "validation"}),
      stage("maskgit", maskgit, overrides=on_tokens),
      stage("samples", maskgit, mode="sample", workdir="{maskgit}", overrides=on_tokens),
      stage("sample_eval", maskgit, mode="eval", workdir="{maskgit}", overrides=on_tokens),
  )
