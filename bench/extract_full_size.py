"""Extraction at the real model sizes (bench_extract.py --full_size): RoBERTa-large and CLIP ViT-B/32 built from
their configurations with random weights (nothing downloaded; the speed of a model does not depend on its
weights), on generated utterances of MELD's kind (a few sentences of conversation; 3.2 s of 1280x720 video at
24 fps, the release's clip size; 3.2 s of audio).

Measured, each warmed up first: utterances/s of the text extraction (first token of the last 4 layers averaged,
COSMIC's kind), of a fine-tuning update (--text_finetune's recipe: 4 batches of 8, one AdamW step), of IS10
audio, and of visual features at 8 frames (the whole path: decoding, preprocessing, the model; and the model
alone); the hours each would take for MELD's 13,708 utterances (fine-tuning: 30 epochs of its 9,989 training
utterances); and each model's time against its floor: its matrix-product FLOPs per utterance at the rate this
CPU multiplies large float32 (and bf16) matrices at.
"""
import os
import time

import numpy as np
import torch

MELD_UTTERANCES, MELD_TRAIN, MELD_VALID, EPOCHS = 13708, 9989, 1109, 30


def matmul_rate(dtype, rows=2048, repeats=3):
    """FLOP/s of a (rows, 1024) x (1024, 4096) product, the shape of a transformer's feed-forward layer."""
    a, b = torch.randn(rows, 1024).to(dtype), torch.randn(1024, 4096).to(dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * rows * 1024 * 4096 / best


def paired(parts):
    """parts: [(fn, its FLOPs)], each timed right after this CPU's float32 matrix-product rate is measured (other
    processes share the CPU, and their load changes). (seconds in all, [each part's time over its floor])."""
    seconds, ratios = 0.0, []
    for fn, flops in parts:
        rate = matmul_rate(torch.float32)
        t = timed(fn)
        seconds += t
        ratios.append(t * rate / flops)
    return seconds, ratios


def row(name, n, seconds, flops, ratios=None, bf16=None, hours=None):
    """One line of the table: utterances/s, hours for MELD, GFLOP per utterance, time over the float32 floor (the
    best and the median part), over the bf16 floor."""
    return (name, n / seconds, hours if hours is not None else MELD_UTTERANCES * seconds / n / 3600, flops / n,
            (min(ratios), float(np.median(ratios))) if ratios else None,
            seconds * bf16 / flops if bf16 else None)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def encoder_flops(layers, hidden, ffn, tokens):
    """Matrix-product FLOPs of one sequence through a transformer encoder (2 per multiply-add): the projections
    and the feed-forward layer per token, attention's two products per pair of tokens."""
    return layers * (2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens * tokens * hidden)


def utterance_texts(n, seed=0):
    from vega_utils.data.toy_models import SENTENCES
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(SENTENCES, int(rng.integers(1, 4)))) for _ in range(n)]


def save_roberta_large(folder, texts):
    """RoBERTa-large's configuration with random weights, and a byte-level BPE tokenizer trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=special))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                            cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                            model_max_length=512).save_pretrained(folder)
    config = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1)
    RobertaModel(config).save_pretrained(folder)
    return folder


def save_clip_b32(folder):
    """CLIP ViT-B/32's configuration (CLIPConfig's defaults) with random weights, and its image processor."""
    import transformers
    from transformers import CLIPConfig, CLIPModel
    CLIPModel(CLIPConfig(projection_dim=512)).save_pretrained(folder)
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_cls().save_pretrained(folder)
    return folder


def text_rows(root, n, device, bf16):
    from tqdm import tqdm

    from vega_utils.features.finetune import Classifier, Recipe, Texts, Trainer
    from vega_utils.features.text import TextExtractor
    texts = utterance_texts(n)
    ex = TextExtractor(save_roberta_large(os.path.join(root, "roberta-large"), texts), "cls", 0, 512, 32, device,
                       layers=4)
    lengths = [len(ids) for ids in ex.tokenizer(texts)["input_ids"]]
    flops = [encoder_flops(24, 1024, 4096, t) for t in lengths]
    ex.features(texts[:32], [""] * 32)
    parts = [(lambda lo=lo: ex.features(texts[lo:lo + 64], [""] * len(texts[lo:lo + 64])), sum(flops[lo:lo + 64]))
             for lo in range(0, n, 64)]
    seconds, ratios = paired(parts)
    rows = [row(f"text RoBERTa-large (4 layers' first token, {np.mean(lengths):.1f} tokens, batch 32)", n, seconds,
                sum(flops), ratios, bf16)]
    ex.batch_size = 128
    big, big_ratios = paired([(lambda lo=lo: ex.features(texts[lo:lo + 128], [""] * len(texts[lo:lo + 128])),
                               sum(flops[lo:lo + 128])) for lo in range(0, n, 128)])
    rows.append(row("text, batch 128", n, big, sum(flops), big_ratios, bf16))
    ex.batch_size, k = 32, min(n, 16)

    def in_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ex.features(texts[:k], [""] * k)
    slow, slow_ratios = paired([(in_bf16, sum(flops[:k]))])
    rows.append(row(f"text, bf16 autocast ({k} utterances)", k, slow, sum(flops[:k]), slow_ratios, bf16))
    recipe = Recipe(batch_size=8, accumulation=4, epochs=1)
    trainer = Trainer(Classifier(ex.model, 7, recipe.dropout, "cls"), recipe, 32, device)
    data = [Texts(ex, [(t, "", "a") for t in texts[lo:lo + 32]], ["a"]) for lo in (0, 32, 64)]
    trainer.epoch(data[0], tqdm(disable=True))                                                    # warm-up
    tune = [3 * sum(flops[lo:lo + 32]) for lo in (32, 64)]                     # forward + backward: 3 forwards
    step, step_ratios = paired([(lambda d=d: trainer.epoch(d, tqdm(disable=True)), f) for d, f in zip(data[1:], tune)])
    hours = EPOCHS * (MELD_TRAIN * step / 64 + MELD_VALID * seconds / n) / 3600
    rows.append(row("fine-tuning update (4 batches of 8, AdamW), float32", 64, step, sum(tune), step_ratios, bf16,
                    hours))
    return rows


def visual_rows(root, n, device, bf16):
    from vega_utils.anchors.images import image_features
    from vega_utils.features.samples import write_mp4
    from vega_utils.features.utterances import Utterance
    from vega_utils.features.visual import VisualExtractor
    clips = [write_mp4(os.path.join(root, f"clip{i}.mp4"), seconds=3.2, fps=24, size=1280, height=720, seed=i)
             for i in range(4)]
    utts = [Utterance(f"row {i}", f"d{i}", 0, "a", "t", video=clips[i % len(clips)]) for i in range(n)]
    ex = VisualExtractor(save_clip_b32(os.path.join(root, "clip")), 8, False, 32, device)
    frame = encoder_flops(12, 768, 3072, 50) + 2 * 3 * 32 * 32 * 768 * 49   # + the patch embedding
    ex.features(utts[:4])
    whole, whole_ratios = paired([(lambda lo=lo: ex.features(utts[lo:lo + 16]), 8 * frame * len(utts[lo:lo + 16]))
                                  for lo in range(0, n, 16)])
    batch = utts[:32]
    pixels = [ex.processor(images=[f for u in batch[lo:lo + 8] for f in ex.decode(u)], return_tensors="pt")[
        "pixel_values"] for lo in range(0, len(batch), 8)]                      # (64, 3, 224, 224) each
    image_features(ex.model, pixels[0], device)
    model, model_ratios = paired([(lambda x=x: image_features(ex.model, x, device), frame * len(x)) for x in pixels])
    return [row("visual CLIP ViT-B/32, 8 frames: model alone (batch 8)", len(batch), model, 8 * frame * len(batch),
                model_ratios, bf16),
            row("visual, whole path (decode 720p, preprocess, model; batch 16)", n, whole, 8 * frame * n,
                whole_ratios, bf16)]


def audio_row(root, n, jobs, device):
    from vega_utils.features.audio import AudioExtractor
    from vega_utils.features.samples import write_wav
    from vega_utils.features.utterances import Utterance
    utts = [Utterance(f"row {i}", f"d{i}", 0, "a", "t", audio=write_wav(os.path.join(root, f"a{i}.wav"), 3.2,
                                                                         seed=i)) for i in range(n)]
    ex = AudioExtractor("is10", 16000, jobs, device)
    ex.features(utts[:4])
    seconds = timed(lambda: ex.features(utts))
    ex.close()
    return (f"audio IS10 ({jobs} worker processes)", n / seconds, MELD_UTTERANCES * seconds / n / 3600, None, None,
            None)


def full_size(root, n, n_visual, jobs, cpu):
    device = torch.device("cpu")
    bf16 = matmul_rate(torch.bfloat16, rows=128, repeats=1)   # without native bf16 it is emulated, and slow
    rows = text_rows(root, n, device, bf16) + visual_rows(root, n_visual, device, bf16)
    rows.append(audio_row(root, n, jobs, device))
    print(f"\nfull size on the CPU ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}), "
          f"{n} utterances ({n_visual} for visual); matrix products: float32 {matmul_rate(torch.float32) / 1e9:.1f} "
          f"GFLOP/s now, bf16 {bf16 / 1e9:.2f} GFLOP/s")
    print(f"{'':<66}{'utt/s':>7}{'MELD h':>8}{'GFLOP/utt':>10}{'x floor f32 best, median':>26}{'x floor bf16':>13}")
    for name, rate, hours, flops, ratios, over_bf16 in rows:
        f32 = f"{ratios[0]:.2f}x, {ratios[1]:.2f}x" if ratios else "-"
        b16 = f"{over_bf16:.3f}x" if over_bf16 else "-"
        print(f"{name:<66}{rate:>7.2f}{hours:>8.2f}{(flops or 0) / 1e9:>10.1f}{f32:>26}{b16:>13}")
    print("x floor: a part's time over its FLOPs at the float32 matrix-product rate measured just before it (1.00x: "
          "no time lost beyond the products), the best and the median part; bf16: the whole time over the FLOPs at "
          "the bf16 rate. MELD h: hours for its 13,708 utterances (fine-tuning: 30 epochs of 9,989 with a "
          "validation pass each)")
