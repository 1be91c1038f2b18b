"""The tiny model, tokenizer and prompts the vLLM tests serve (helpers, imported by conftest and tests)."""

from __future__ import annotations

VOCAB = 128
MAX_LEN = 256
WORDS = ("the a movie film was great bad not good terrible plot actors loved hated it is classify sentiment "
         "of this review positive negative : . , ! ? and but very translate answer question").split()
# name: (init text, its length is the prompt's length). Lengths differ, so rows of the batch differ.
PROMPTS = {
    "sentiment": "classify the sentiment of this review :",
    "short": "answer :",
    "long": "translate the plot of this movie and answer the question very good but not bad , it is",
}
# Engine settings the CPU backend needs with a tiny model (head_dim 128/2 = 64: the CPU attention
# backend refuses head_dim < 64); fp32 so tokens compare exactly with transformers on CPU.
ENGINE = dict(enable_prompt_embeds=True, enforce_eager=True, dtype="float32", max_model_len=MAX_LEN,
              gpu_memory_utilization=0.05, max_num_seqs=32, seed=0)


def build_tiny_llama(path: str) -> None:
    """A tiny Llama (2 layers, hidden 128, 2 heads of 64) and a word-level tokenizer, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    # initializer_range 0.2 (not 0.02): peaked next-token distributions, so greedy ties are unlikely.
    config = LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=MAX_LEN, vocab_size=VOCAB, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def build_prompts(model_dir: str, path: str) -> None:
    """PROMPTS initialised from their text, moved as training would move them, saved as one set."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_softprompt import SoftPromptConfig, add_soft_prompt, save_soft_prompt

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    for name, text in PROMPTS.items():
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=len(text.split()), init="text", init_text=text,
                                                tokenizer_name_or_path=model_dir), name=name)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # only the prompts
                param.mul_(3.0).add_(torch.randn_like(param), alpha=0.3)
    save_soft_prompt(model, path)
