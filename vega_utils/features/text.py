"""Text features: a transformers encoder (AutoTokenizer + AutoModel), one vector per utterance.

Pooling (--text_pooling) over the last hidden layer, or the average of the last --text_layers K layers:
    cls   the first token's vector (RoBERTa's <s>, BERT's [CLS]);
    mean  the average over the target utterance's own tokens (special tokens and context left out).
Context (--text_context N): the N preceding utterances of the same dialogue, joined by spaces, go in as the
first segment of a sequence pair and the utterance as the second (tokenizer(context, utterance)); the model
reads both, and mean pooling averages only the utterance's tokens. cls pooling reads the first token, which
attends to the context too. With N = 0 the utterance is encoded alone.
The utterances are tokenised once, in one call; batches are cut from them sorted by token length (longest
first), so little padding is computed. A sequence longer than the limit is truncated (the longer segment first:
the context, as a rule) and counted; the limit is --max_length or the number of positions the model has, whichever
is smaller (a 512-position RoBERTa cannot read a 600-token sequence).
"""
import numpy as np
import torch

from vega_utils.common import VegaError
from vega_utils.features.hub import reason
from vega_utils.features.record import weights_sha256

POOLINGS = ("cls", "mean")


def load_text_model(name, device, **config):
    """(fast tokenizer, float32 encoder in eval mode); config sets those of its configuration's values that it
    has (the dropout of fine-tuning)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        settings = AutoConfig.from_pretrained(name)
        for key, value in config.items():
            if hasattr(settings, key):
                setattr(settings, key, value)
        model = AutoModel.from_pretrained(name, config=settings)
    except Exception as e:   # offline and not cached, not a model folder, ...
        raise VegaError(f"could not load text model {name!r} ({reason(e)}); give a local folder saved with "
                        f"save_pretrained or a hub name in the local cache") from None
    if not tokenizer.is_fast:
        raise VegaError(f"text model {name!r}: its tokenizer is not a fast tokenizer (needed to tell the "
                        f"utterance's tokens from the context's)")
    return tokenizer, model.float().to(device).eval()


def positions_of(model):
    """How many tokens the model reads at most (its position embeddings), None when it does not say. RoBERTa-like
    models number positions from padding_idx + 1, so 514 embeddings read 512 tokens."""
    embeddings = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    if isinstance(embeddings, torch.nn.Embedding):
        skipped = embeddings.padding_idx + 1 if embeddings.padding_idx is not None else 0
        return embeddings.num_embeddings - skipped
    return getattr(model.config, "max_position_embeddings", None)


class TextExtractor:
    """recorded: the model's name in the record when it differs from the folder it loads from (a fine-tuned
    encoder is recorded by its folder's name, wherever that folder is found)."""

    def __init__(self, name, pooling, context, max_length, batch_size, device, layers=1, recorded=None, **config):
        if pooling not in POOLINGS:
            raise VegaError(f"unknown text pooling {pooling!r}: one of {', '.join(POOLINGS)}")
        self.name, self.pooling, self.context = name, pooling, context
        self.batch_size, self.device, self.recorded = batch_size, device, recorded or name
        self.tokenizer, self.model = load_text_model(name, device, **config)
        depth = getattr(self.model.config, "num_hidden_layers", None)
        if layers < 1 or (depth is not None and layers > depth):
            raise VegaError(f"--text_layers {layers}: text model {name!r} has {depth} hidden layers")
        self.max_length, self.layers = max_length, layers
        self.limit = min(max_length, positions_of(self.model) or max_length)   # what is read (max_length: asked)
        self.truncated = 0

    def describe(self):
        return {"model": self.recorded, "weights_sha256": weights_sha256(self.name), "pooling": self.pooling,
                "context": self.context, "max_length": self.max_length, "layers": self.layers,
                "dim": int(self.model.config.hidden_size)}

    def tokenize(self, targets, contexts, truncation):
        kw = dict(truncation=True, max_length=self.limit) if truncation else {}
        return self.tokenizer(contexts, targets, **kw) if self.context else self.tokenizer(targets, **kw)

    def encode_all(self, targets, contexts):
        """Every utterance tokenised once, in one call: (model input lists per utterance, the masks of the
        utterance's own tokens); the sequences over the limit are tokenised again, truncated, and counted."""
        enc = self.tokenize(targets, contexts, truncation=False)
        target = 1 if self.context else 0
        rows = [{k: enc[k][i] for k in enc.keys()} for i in range(len(targets))]
        masks = [[s == target for s in enc.sequence_ids(i)] for i in range(len(targets))]
        long = [i for i, r in enumerate(rows) if len(r["input_ids"]) > self.limit]
        self.truncated += len(long)
        if long:
            cut = self.tokenize([targets[i] for i in long], [contexts[i] for i in long], truncation=True)
            for j, i in enumerate(long):
                rows[i] = {k: cut[k][j] for k in cut.keys()}
                masks[i] = [s == target for s in cut.sequence_ids(j)]
        return rows, masks

    def features(self, targets, contexts):
        """(n, D) float32 features of n utterances (contexts: their context texts, used when context > 0).
        Batches are cut from the utterances sorted by token length, so a batch's padding is small."""
        rows, masks = self.encode_all(targets, contexts)
        order = np.argsort(-np.asarray([len(r["input_ids"]) for r in rows]), kind="stable")   # longest first
        out = np.zeros((len(targets), self.model.config.hidden_size), dtype=np.float32)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            out[idx] = self.pool(self.pad([rows[i] for i in idx], [masks[i] for i in idx]))
        return out

    def pad(self, rows, masks):
        """Right-padded tensors of a batch: the model inputs and the utterance's-token mask (B, L)."""
        width = max(len(r["input_ids"]) for r in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        batch = {}
        for k in rows[0]:
            fill = pad_id if k == "input_ids" else 0
            batch[k] = torch.tensor([r[k] + [fill] * (width - len(r[k])) for r in rows], dtype=torch.long)
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                    for r in rows], dtype=torch.long)
        target = torch.tensor([m + [False] * (width - len(m)) for m in masks])
        return batch, target

    def pool(self, encoded):
        batch, mask = encoded
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in batch.items()}, output_hidden_states=self.layers > 1)
            hidden = (out.last_hidden_state if self.layers == 1 else
                      torch.stack(out.hidden_states[-self.layers:]).mean(0))   # (K, B, L, D) -> (B, L, D)
        return pool_tokens(hidden.float().cpu(), mask, batch["attention_mask"], self.pooling).numpy()


def pool_tokens(hidden, mask, attention_mask, pooling):
    """(B, D) vectors of hidden states (B, L, D): the first token (cls), or the mean over the utterance's own
    tokens (mean; mask (B, L) marks them; a sequence with none left averages all its tokens)."""
    if pooling == "cls":
        return hidden[:, 0]                                               # (B, L, D) -> (B, D)
    mask = mask.to(hidden.device)
    mask = mask | ~mask.any(dim=1, keepdim=True)                          # no token left: every position
    mask = mask & attention_mask.to(hidden.device).bool()
    weights = mask.to(hidden.dtype).unsqueeze(-1)                         # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1)                     # (B, L, D) -> (B, D)


def contexts_of(utterances, n):
    """Each utterance's context: the texts of the n utterances before it in its dialogue, joined by spaces."""
    out, previous = [], {}
    for u in utterances:
        seen = previous.setdefault(u.dialogue_id, [])
        out.append(" ".join(seen[-n:]) if n else "")
        seen.append(u.text)
    return out
