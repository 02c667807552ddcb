"""The tests' one builder of tiny random models and tokenizers (no weights are ever downloaded).

tiny_llama builds every random Llama of the tests; word_level_tokenizer (char_tokenizer: its character-level
ChatML form) and byte_bpe_tokenizer every tokenizer;
make_tiny_model saves the common pair as an HF directory (conftest.py's `tiny_dir` fixture).
"""
import torch

VOCAB = 300
# The ChatML chat template of the tests' tokenizers (SmolLM2's format)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# hidden size, MLP size, layers, attention heads, key/value heads
SIZES = {"small": (64, 128, 2, 4, 2), "micro": (32, 64, 1, 2, 1)}


def tiny_llama(vocab_size, *, size="small", seed=0, head="lm", tokenizer=None, **config):
    """A random Llama: ``size`` "small" (hidden 64, 2 layers) or "micro" (hidden 32, 1 layer); ``head`` "lm"
    (LlamaForCausalLM) or "score" (LlamaForSequenceClassification, a reward model; pass num_labels=1).

    ``seed``: torch.manual_seed before the weights are drawn; None draws from the generator as it stands (a
    second model right after the first). ``tokenizer``: takes its eos / pad / bos ids. ``config``: any other
    LlamaConfig field (max_position_embeddings, initializer_range, tie_word_embeddings, ...). Returned as
    constructed (training mode).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    hidden, mlp, layers, heads, kv_heads = SIZES[size]
    if tokenizer is not None:
        config = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, **config)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, **config)
    if seed is not None:
        torch.manual_seed(seed)
    return {"lm": LlamaForCausalLM, "score": LlamaForSequenceClassification}[head](cfg)


def word_level_tokenizer(tokens, unk, *, pre_tokenizer=None, chat_template=None, **special_tokens):
    """A fast tokenizer with one id per token of ``tokens`` (in order; duplicates dropped), ``unk`` for anything
    else; ``special_tokens`` (eos_token=..., pad_token=...) go to PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))}, unk_token=unk))
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def char_tokenizer():
    """A character-level fast tokenizer with the ChatML template: every printable ASCII char is one token."""
    from tokenizers import Regex, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    return word_level_tokenizer(["[UNK]", "<|im_start|>", "<|im_end|>", "[PAD]", *chars], "[UNK]",
                                pre_tokenizer=pre_tokenizers.Split(Regex("."), behavior="isolated"),
                                chat_template=CHATML, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="[PAD]",
                                additional_special_tokens=["<|im_start|>"])


def make_tiny_model(path, seed=0, tie=True):
    """A 2-layer Llama (hidden 64, vocab 300) with a word-level tokenizer, saved as an HF directory."""
    tiny_llama(VOCAB, seed=seed, tie_word_embeddings=tie, max_position_embeddings=256, eos_token_id=2,
               pad_token_id=0, bos_token_id=1).save_pretrained(path)
    tok = word_level_tokenizer(["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(3, VOCAB))], "<pad>",
                               pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tok.save_pretrained(path)
    return path


def byte_bpe_tokenizer(corpus, chat_template=CHATML, vocab_size=320):
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
