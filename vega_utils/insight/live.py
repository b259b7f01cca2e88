"""Live curves: every epoch's metrics.jsonl row as TensorBoard scalars in the run folder.

    tensorboard --logdir output/

The event files sit in the run folder itself, so TensorBoard names each run by its folder
(`IEMOCAP/[1201-2235]_seed64`).
Tags group the scalars into TensorBoard's sections (`loss/`, `f1/`, `metrics/`, `alignment/`, ...), see `tag()`.
The step is the epoch number. A resumed run purges the steps after its last saved epoch, so an epoch that was
logged but not saved in last.pth (a crash between the two writes) is not shown twice.
"""

SPLITS = ("train", "valid", "test")
QUIET_KEYS = ("epoch", "is_best")   # the step itself, and a flag (the best epoch is on curves.png)


def tag(key, class_names=()):
    """The TensorBoard tag of a metrics.jsonl key.

    test_loss -> loss/test_total; test_cls_all -> loss_terms/test_cls_all; test_f1_t -> f1/test_t;
    test_accuracy -> metrics/test_accuracy; test_align_all_own -> alignment/test_all_own;
    test_align_all_own_sad -> alignment_per_class/test_all_own_sad; train_seconds -> seconds/train; lr -> lr;
    anything else -> run/<key>."""
    if key == "lr":
        return "lr"
    if key.endswith("_seconds"):
        return f"seconds/{key[:-len('_seconds')]}"
    split, _, rest = key.partition("_")
    if split not in SPLITS or not rest:
        return f"run/{key}"
    if rest == "loss":
        return f"loss/{split}_total"
    if rest.startswith("f1_"):
        return f"f1/{split}_{rest[3:]}"
    if rest in ("accuracy", "weighted_precision", "macro_f1"):
        return f"metrics/{split}_{rest}"
    if rest.startswith("align_"):
        per_class = any(rest.endswith(f"_{c}") for c in class_names)
        return f"alignment{'_per_class' if per_class else ''}/{split}_{rest[len('align_'):]}"
    return f"loss_terms/{split}_{rest}"


def scalars(row, class_names=()):
    """{tag: value} of every number in a metrics row (booleans and the epoch itself left out)."""
    out = {}
    for key, value in row.items():
        if key in QUIET_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[tag(key, class_names)] = float(value)
    return out


class LiveLog:
    """TensorBoard writer of one run; does nothing when disabled or when tensorboard is not installed."""

    def __init__(self, run_dir, enabled, first_epoch=1, class_names=(), log=print):
        self.writer, self.class_names = None, tuple(class_names)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: tensorboard is not installed, so no live curves (pip install tensorboard; "
                "--no_tensorboard silences this)")
            return
        # purge_step: TensorBoard hides events of steps >= it written before (a resumed run's repeated epoch)
        self.writer = SummaryWriter(log_dir=run_dir, purge_step=first_epoch if first_epoch > 1 else None)

    def epoch(self, row):
        if self.writer is None:
            return
        step = int(row["epoch"])
        for name, value in scalars(row, self.class_names).items():
            # a NaN (an epoch whose every training step was skipped) is written as it is: a gap in the curve
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()   # live: visible to TensorBoard as soon as the epoch ends

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
