"""Tiny random models saved with save_pretrained, for examples and tests that must run offline.

Nothing here reaches a model hub: a model is built from its config with random weights. Its features mean
nothing, but every code path that loads a model folder (the anchor builder, extract.py) runs on it as on a
real one, in seconds:

    python -m vega_utils.data.toy_models clip mydata/clip       # a CLIP folder: model + image processor
    python -m vega_utils.data.toy_models text mydata/text       # a BERT-style text encoder + its tokenizer
    python -m vega_utils.data.toy_models whisper mydata/asr     # a Whisper: model + feature extractor + tokenizer
"""
import argparse
import sys

from vega_utils.common import OneLineParser, exit_on_error

SENTENCES = ["excuse me", "do you have your forms", "yeah", "let me see them", "is there a problem",
             "who told you to get in this line", "you did", "you were standing at the beginning",
             "okay but i got here first", "oh god no", "i am so happy for you", "that is terrible news"]


def save_tiny_text_model(folder, hidden=32, layers=2, seed=0, sentences=None):
    """A BERT of a few layers and a word-piece tokenizer, both saved in folder: trained on SENTENCES, or given
    sentences, a vocabulary of their words in sorted order (a trained one may order its ties differently from
    one run to the next)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for s in sentences or [] for w in s.lower().split()})
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(special + words)} if sentences else None,
                                     unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if not sentences:
        tok.train_from_iterator(SENTENCES * 3, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return str(folder)


def save_tiny_clip(folder, projection_dim=16, image_size=32, seed=0, hidden=16, layers=1, patch_size=8):
    """A randomly initialised, very small CLIP (features of width projection_dim) and its image processor; hidden,
    layers and patch_size shape its vision tower."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden if hidden > 16 else 32,
                           num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                           image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    # A small resize and crop keep preprocessing cheap; mean and std stay the OpenAI CLIP defaults. transformers
    # 5 names the Pillow-based processor apart (its default one needs torchvision).
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_cls(size={"shortest_edge": image_size},
                  crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return str(folder)


def save_tiny_whisper(folder, width=16, seed=0):
    """A Whisper of one encoder and one decoder layer, its feature extractor (80 mel bins, 30 s windows) and a
    byte-level BPE tokenizer trained on SENTENCES with Whisper's special and timestamp tokens, in folder. Its
    words mean nothing, but it writes timestamped segments like a real one."""
    import os

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )
    os.makedirs(folder, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(folder)                                   # vocab.json, merges.txt
    end = "<|endoftext|>"
    tok = WhisperTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), unk_token=end,
                           bos_token=end, eos_token=end, pad_token=end)
    special = ["<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
               "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    tok.add_tokens(special + [f"<|{0.02 * i:.2f}|>" for i in range(1501)], special_tokens=True)
    tok.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in [end] + special}
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, d_model=width,
                           encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, max_target_positions=64,
                           decoder_start_token_id=ids["<|startoftranscript|>"], pad_token_id=ids[end],
                           bos_token_id=ids[end], eos_token_id=ids[end])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids[end], pad_token_id=ids[end],
        bos_token_id=ids[end], no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        max_initial_timestamp_index=50, max_length=64, suppress_tokens=[], begin_suppress_tokens=[ids[end]])
    model.save_pretrained(folder)
    return str(folder)


def parser():
    p = OneLineParser(prog="python -m vega_utils.data.toy_models", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["clip", "text", "whisper"],
                   help="which model: clip (a CLIP model and its image processor), text (an encoder and its "
                        "tokenizer) or whisper (a speech-recognition model, its feature extractor and tokenizer)")
    p.add_argument("folder", help="where to save it (created)")
    p.add_argument("--dim", type=int, default=16,
                   help="width of the features: CLIP's image features, the text encoder's hidden size "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    def make():
        if args.kind == "clip":
            save_tiny_clip(args.folder, projection_dim=args.dim, seed=args.seed)
        elif args.kind == "whisper":
            save_tiny_whisper(args.folder, width=args.dim, seed=args.seed)
        else:
            save_tiny_text_model(args.folder, hidden=args.dim, seed=args.seed)
        print(f"a tiny random {args.kind} model (features of width {args.dim}) in {args.folder}")
    return exit_on_error(make)


if __name__ == "__main__":
    sys.exit(main())
