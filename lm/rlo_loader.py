"""The loader shipped inside every packed RLO checkpoint (copied there as `rlo_loader.py`; config.json's
`auto_map` names its `RloConfig`), for `from_pretrained(DIR, trust_remote_code=True)`: it imports the
toolkit, which registers the packed format with transformers, and hands over the toolkit's `RloConfig`
(`lm.checkpoint`). Without the toolkit on PYTHONPATH it fails with one line saying so. The import sits in
a try block so that transformers' check of a remote file's imports does not ask to pip-install `lm`.
"""
try:
    from lm.checkpoint import RloConfig  # noqa: F401  (importing lm registers quant_method and model_type "rlo")
except ImportError as err:
    raise ImportError(
        f"this is a packed low-bit checkpoint of the RLO toolkit ({err}): its linear layers are codes that "
        "only the toolkit's quant package decodes; put the toolkit's folder (the one holding lm/ and "
        "quant/) on PYTHONPATH (then `import lm` before from_pretrained, or keep trust_remote_code=True)"
    ) from None
