"""--text_finetune: the text encoder is fine-tuned for utterance emotion classification before its features are
read, as COSMIC's feature extraction did for the IEMOCAP and MELD features that SDT and VEGA use.

The encoder gets a sentence-classification head (RoBERTa's: dropout, dense, tanh, dropout, projection) on its
pooled last layer and is trained on the labelled `train` utterances; the epoch with the best accuracy on the
`valid` utterances is kept (without labelled valid rows, a seeded 10% of the training dialogues is held out
instead, and recorded). The labels of `test` and `predict` rows never reach the training or the choice: they
are read only afterwards, to report the chosen classifier's own test weighted F1 (a text-only baseline).

The recipe (Recipe, every value a flag of extract.py): AdamW (decoupled weight decay, as fairseq's Adam) with
betas (0.9, 0.98), eps 1e-6, weight decay 0.1, peak learning rate 1e-6 reached linearly over the first 6% of
the updates and decaying linearly to 0 at the last epoch, dropout 0.2, batches of 8 with gradients accumulated
over 4, 30 epochs. Precision: training's `--amp auto` rule (CUDA: fp16 with a gradient scaler; the CPU: bf16
only where it computes bf16 natively, else float32).

Resumable: after every epoch, OUT.npz.finetune/state.pt holds the model, optimizer, schedule, scaler, random
states and the best epoch so far (its weights in best.pt), each written atomically; the same command continues
from there, to the weights an uninterrupted run ends with. The chosen encoder and its tokenizer are saved with
save_pretrained in OUT.text_encoder/ (beside the features, with finetune.json), which --like reads back.
"""
import hashlib
import json
import math
import os
import random
import shutil
import signal
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vega_utils.common import VegaError, atomic_torch_save, atomic_write_text
from vega_utils.cpu import cpu_dtype
from vega_utils.features.record import weights_sha256
from vega_utils.features.text import TextExtractor, pool_tokens
from vega_utils.runs.threads import CoreShare

# For tests of resuming: "N:KILL" or "N:INT" sends this process SIGKILL or SIGINT once epoch N's state is saved.
STOP_AFTER = "VEGA_FINETUNE_STOP_AFTER_EPOCH"


@dataclass
class Recipe:
    epochs: int = 30
    lr: float = 1e-6
    batch_size: int = 8
    accumulation: int = 4
    warmup: float = 0.06        # share of the updates over which the learning rate rises to lr
    weight_decay: float = 0.1
    dropout: float = 0.2        # the head's and the encoder's hidden_dropout_prob
    beta2: float = 0.98         # Adam's betas are (0.9, beta2)
    eps: float = 1e-6
    seed: int = 0
    amp: str = "auto"           # auto | bf16 | off


def autocast_dtype(amp, device):
    """(the autocast dtype or None for float32, why) by training's --amp rule (vega_utils/cpu.py on the CPU)."""
    if device.type == "cuda" and amp != "off":
        return (torch.bfloat16, "--finetune_amp bf16") if amp == "bf16" else (torch.float16, "CUDA: fp16 autocast")
    return cpu_dtype(amp)


class Classifier(nn.Module):
    def __init__(self, encoder, classes, dropout, pooling):
        super().__init__()
        width = encoder.config.hidden_size
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout),
                                  nn.Linear(width, classes))

    def forward(self, batch, mask):
        hidden = self.encoder(**batch).last_hidden_state                     # (B, L, H)
        return self.head(pool_tokens(hidden, mask, batch["attention_mask"], self.pooling))   # (B, C)


class Texts:
    """Utterances tokenised once (the extractor's way), their labels, and padded batches of them."""

    def __init__(self, extractor, items, classes):
        self.extractor = extractor
        self.rows, self.masks = extractor.encode_all([t for t, _, _ in items], [c for _, c, _ in items])
        self.labels = torch.tensor([classes.index(y) if y in classes else -1 for _, _, y in items])

    def __len__(self):
        return len(self.rows)

    def batch(self, idx, device):
        batch, mask = self.extractor.pad([self.rows[i] for i in idx], [self.masks[i] for i in idx])
        return {k: v.to(device) for k, v in batch.items()}, mask.to(device), self.labels[idx].to(device)


def evaluate(model, data, batch_size, device, dtype):
    """(accuracy, weighted F1) in percent of the model's predictions on data."""
    from sklearn.metrics import f1_score
    model.eval()
    order = np.argsort([-len(r["input_ids"]) for r in data.rows], kind="stable")
    predicted = torch.empty(len(data), dtype=torch.long)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for lo in range(0, len(order), batch_size):
            idx = torch.as_tensor(order[lo:lo + batch_size])
            batch, mask, _ = data.batch(idx, device)
            predicted[idx] = model(batch, mask).argmax(-1).cpu()
    truth = data.labels.numpy()
    return 100 * float((predicted.numpy() == truth).mean()), 100 * f1_score(truth, predicted.numpy(),
                                                                             average="weighted", zero_division=0)


def split(utts, contexts, seed):
    """(train items, valid items, how valid was chosen); an item is (text, context, label)."""
    labelled = [(u, c) for u, c in zip(utts, contexts) if u.label and u.split in ("train", "valid")]
    valid = [(u.text, c, u.label) for u, c in labelled if u.split == "valid"]
    train = [(u, c) for u, c in labelled if u.split == "train"]
    if not train:
        raise VegaError("--text_finetune needs labelled train utterances")
    if valid:
        return [(u.text, c, u.label) for u, c in train], valid, f"the valid split ({len(valid)} utterances)"
    dialogues = list(dict.fromkeys(u.dialogue_id for u, _ in train))
    if len(dialogues) < 2:
        raise VegaError("--text_finetune needs valid utterances, or at least 2 training dialogues to hold out 10%")
    held = set(random.Random(seed).sample(dialogues, max(1, round(0.1 * len(dialogues)))))
    pick = [[(u.text, c, u.label) for u, c in train if (u.dialogue_id in held) == v] for v in (False, True)]
    return pick[0], pick[1], (f"10% of the training dialogues held out (seed {seed}): "
                              + ", ".join(d for d in dialogues if d in held))


def stop_for_test(epoch):
    when, _, how = os.environ.get(STOP_AFTER, "").partition(":")
    if when and int(when) == epoch:
        os.kill(os.getpid(), signal.SIGKILL if how == "KILL" else signal.SIGINT)


class Trainer:
    """The classifier, its optimizer, learning-rate schedule, gradient scaler (CUDA fp16) and shuffling, and
    their state as one checkpoint."""

    def __init__(self, model, recipe, n_train, device):
        self.model, self.recipe, self.device = model, recipe, device
        self.dtype, self.why = autocast_dtype(recipe.amp, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, recipe.beta2), eps=recipe.eps,
                                     weight_decay=recipe.weight_decay)
        steps = math.ceil(math.ceil(n_train / recipe.batch_size) / recipe.accumulation) * recipe.epochs
        warm = max(1, round(recipe.warmup * steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
        self.shuffle = torch.Generator().manual_seed(recipe.seed)

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": torch.get_rng_state(), "shuffle": self.shuffle.get_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.shuffle.set_state(state["shuffle"])

    def epoch(self, data, bar):
        """One pass over data in a fresh shuffled order; the mean training loss."""
        r, total = self.recipe, 0.0
        self.model.train()
        order = torch.randperm(len(data), generator=self.shuffle)
        batches = [order[lo:lo + r.batch_size] for lo in range(0, len(order), r.batch_size)]
        for k, idx in enumerate(batches):
            group = min(r.accumulation, len(batches) - k // r.accumulation * r.accumulation)  # batches in this step
            batch, mask, labels = data.batch(idx, self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = F.cross_entropy(self.model(batch, mask).float(), labels)
            (self.scaler.scale(loss / group) if self.scaler else loss / group).backward()
            total += float(loss.detach()) * len(idx)
            if (k + 1) % r.accumulation == 0 or k + 1 == len(batches):
                if self.scaler:
                    self.scaler.step(self.opt)
                    self.scaler.update()
                else:
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.schedule.step()
            bar.update(len(idx))
        return total / len(data)


def train(settings, recipe, classes, train_items, valid_items, folder, device, batch_size, progress):
    """Fine-tune, resuming from folder's state.pt; returns (the classifier with the best epoch's weights, the
    extractor that tokenised, the epochs' records, the best epoch's, the precision's name)."""
    import time

    from tqdm import tqdm
    ex = TextExtractor(settings.text_model, settings.text_pooling, settings.text_context, settings.max_length,
                       batch_size, device, hidden_dropout_prob=recipe.dropout)
    train_set, valid_set = Texts(ex, train_items, classes), Texts(ex, valid_items, classes)
    torch.manual_seed(recipe.seed)
    model = Classifier(ex.model, len(classes), recipe.dropout, settings.text_pooling).to(device)
    trainer = Trainer(model, recipe, len(train_set), device)
    name = "float32" if trainer.dtype is None else str(trainer.dtype).replace("torch.", "")
    print(f"fine-tune precision: {name} ({trainer.why})")
    state_path, best_path = os.path.join(folder, "state.pt"), os.path.join(folder, "best.pt")
    epoch, history, best = 0, [], None
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        trainer.load(state)
        epoch, history, best = state["epoch"], state["history"], state["best"]
        del state
        print(f"fine-tune: resuming after epoch {epoch} ({state_path})")
    saved = epoch
    # idle OpenMP threads sleep while other processes keep the cores busy (runs/threads.py)
    share = CoreShare(torch.get_num_threads()).start() if device.type == "cpu" else None
    try:
        while epoch < recipe.epochs:
            epoch += 1
            start = time.perf_counter()
            with tqdm(total=len(train_set), desc=f"fine-tune epoch {epoch}/{recipe.epochs} ({name})", unit="utt",
                      disable=not progress) as bar:
                loss = trainer.epoch(train_set, bar)
            rate = len(train_set) / (time.perf_counter() - start)
            accuracy, f1 = evaluate(model, valid_set, batch_size, device, trainer.dtype)
            improved = best is None or accuracy > best["valid_accuracy"]
            if improved:
                best = {"epoch": epoch, "valid_accuracy": accuracy, "valid_weighted_f1": f1}
                atomic_torch_save(model.state_dict(), best_path)
            history.append({"epoch": epoch, "train_loss": loss, "valid_accuracy": accuracy, "valid_weighted_f1": f1})
            print(f"fine-tune epoch {epoch}/{recipe.epochs}: train loss {loss:.4f} | valid accuracy {accuracy:.2f}, "
                  f"weighted F1 {f1:.2f} | {rate:.1f} utt/s{' *' if improved else ''}")
            atomic_torch_save({**trainer.state(), "epoch": epoch, "history": history, "best": best}, state_path)
            saved = epoch
            stop_for_test(epoch)
    except KeyboardInterrupt:
        raise VegaError(f"fine-tuning interrupted: run the same command again to continue after epoch {saved} "
                        f"(its state is in {folder})") from None
    finally:
        if share is not None:
            share.close()
    model.load_state_dict(torch.load(best_path, weights_only=True))
    return model, ex, history, best, f"{name} ({trainer.why})"


def encoder_folder(out):
    """Where --text_finetune saves the chosen encoder: OUT.text_encoder/ beside OUT.npz."""
    return os.path.splitext(out)[0] + ".text_encoder"


def plan_of(settings, recipe, classes, train_items, valid_items, how):
    """What decides the fine-tuned weights (never a test or predict label): a saved encoder or checkpoint
    folder of another plan is refused, not reused."""
    text = json.dumps({"model": settings.text_model, "weights_sha256": weights_sha256(settings.text_model),
                       "pooling": settings.text_pooling, "context": settings.text_context,
                       "max_length": settings.max_length, "recipe": asdict(recipe), "classes": classes,
                       "train": train_items, "valid": valid_items, "valid_from": how}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def fine_tuned_encoder(utts, contexts, settings, out, device, batch_size, progress):
    """(the folder of the chosen encoder, its fine-tune record); trains it unless OUT.text_encoder/ holds the
    encoder of the same plan already (an extraction interrupted after its fine-tuning)."""
    recipe = Recipe(**settings.text_finetune)
    classes = settings.classes or sorted({u.label for u in utts if u.label and u.split in ("train", "valid")})
    train_items, valid_items, how = split(utts, contexts, recipe.seed)
    plan = plan_of(settings, recipe, classes, train_items, valid_items, how)
    target, work = encoder_folder(out), f"{out}.finetune"
    done = os.path.join(target, "finetune.json")
    if os.path.exists(target):
        record = json.load(open(done)) if os.path.exists(done) else {}
        if record.get("plan") != plan:
            raise VegaError(f"{target} holds a text encoder of another fine-tuning (other model, recipe or "
                            f"utterances); remove that folder, or write to another --out")
        print(f"fine-tune: the encoder in {target} was fine-tuned for this extraction already; it is reused")
        return target, located(record, target)
    os.makedirs(work, exist_ok=True)
    plan_path = os.path.join(work, "plan.json")
    if os.path.exists(plan_path) and json.load(open(plan_path)).get("plan") != plan:
        raise VegaError(f"{work} holds the fine-tuning state of another extraction; remove that folder, or "
                        f"write to another --out")
    atomic_write_text(plan_path, json.dumps({"plan": plan}))
    print(f"fine-tune: {settings.text_model} on {len(train_items)} train utterances, {len(classes)} classes; "
          f"valid: {how}")
    model, ex, history, best, precision = train(settings, recipe, classes, train_items, valid_items, work, device,
                                                batch_size, progress)
    test = [(u.text, c, u.label) for u, c in zip(utts, contexts) if u.split == "test" and u.label]  # read only now
    test_acc, test_f1 = evaluate(model, Texts(ex, test, classes), batch_size, device,
                                 autocast_dtype(recipe.amp, device)[0]) if test else (None, None)
    print(f"fine-tune: epoch {best['epoch']} chosen: valid accuracy {best['valid_accuracy']:.2f}, weighted F1 "
          f"{best['valid_weighted_f1']:.2f}" + (f"; test accuracy {test_acc:.2f}, weighted F1 {test_f1:.2f} (the "
                                                f"text-only classifier)" if test else "; no labelled test rows"))
    record = {"plan": plan, "base_model": settings.text_model, "base_weights_sha256": weights_sha256(
        settings.text_model), "classes": classes, "valid_from": how, "train_utterances": len(train_items),
        "valid_utterances": len(valid_items), "precision": precision, "device": str(device), "epochs": history,
        "best_epoch": best["epoch"], "valid_accuracy": best["valid_accuracy"],
        "valid_weighted_f1": best["valid_weighted_f1"], "test_accuracy": test_acc, "test_weighted_f1": test_f1,
        "test_utterances": len(test)}
    staging = f"{target}.saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.encoder.save_pretrained(staging)
    ex.tokenizer.save_pretrained(staging)
    atomic_write_text(os.path.join(staging, "finetune.json"), json.dumps(record, indent=1) + "\n")
    os.replace(staging, target)
    shutil.rmtree(work, ignore_errors=True)
    return target, located(record, target)


def located(record, folder):
    """The fine-tune record as the extraction record carries it: where the encoder is, and its weights' sha256."""
    return {**{k: v for k, v in record.items() if k != "plan"}, "encoder": os.path.abspath(folder),
            "encoder_weights_sha256": weights_sha256(folder)}


def recorded_encoder(record, like_path):
    """The folder of a --like extraction's fine-tuned encoder: where the record says it was written, else the
    folder of that name beside the --like dataset JSON (a data folder moved with its encoder)."""
    name = record["extractors"]["text"]["model"]
    candidates = [record["text_finetune"]["encoder"]]
    if like_path:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(like_path)), name))
    for folder in candidates:
        if os.path.isdir(folder):
            return folder
    raise VegaError(f"the fine-tuned text encoder of {like_path or 'the recorded extraction'} is not found (looked "
                    f"in {' and '.join(candidates)}); --text_finetune saved it beside the features: keep that "
                    f"folder with them")
