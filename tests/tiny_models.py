"""Tiny random models built in the tests (no weights are ever downloaded)."""
import torch

VOCAB = 300


def make_tiny_model(path, seed=0, tie=True):
    """A 2-layer Llama (hidden 64, vocab 300) with a word-level tokenizer, saved as an HF directory."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie, max_position_embeddings=256,
                      eos_token_id=2, pad_token_id=0, bos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tok.save_pretrained(path)
    return path


def byte_bpe_tokenizer(corpus, chat_template, vocab_size=320):
    """A byte-level BPE tokenizer trained on ``corpus`` with ChatML-style special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = chat_template
    return fast
