"""One small file per pretrained text encoder; each defines `load(model_dir, max_length) -> TextEncoder` mapping
its checkpoint onto `text_encoder.TextTransformer` with `text_encoder.assemble`, and is named in
`text_encoder.TEXT_ENCODERS`."""
