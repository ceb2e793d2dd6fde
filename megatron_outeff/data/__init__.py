"""Data pipeline: tokenizers, raw-corpus reading, preprocessing into megatron indexed datasets,
and train/valid/test dataset building through megatron-core.

Import the submodules directly; this package __init__ stays import-light on purpose (anything
under megatron.core costs ~5 s to import, which the tokenizer CLIs should not pay):
  megatron_outeff.data.tokenizer   load_tokenizer, SentencePieceTokenizer, HFTokenizer
  megatron_outeff.data.tokenizer_training   train_sentencepiece
  megatron_outeff.data.preprocess  preprocess_corpus            (imports megatron.core)
  megatron_outeff.data.datasets    build_gpt_datasets, build_gpt_streams, ResumableBatchSampler, MicroBatchIterator
"""
