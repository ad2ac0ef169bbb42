"""Per-epoch history: history.csv and curves.png, both rewritten atomically after every epoch."""

import csv
import io
import math

from keraslm.files import atomic_path, write_text_atomic

COLUMNS = (
    "epoch",
    "loss",
    "perplexity",
    "bpc",
    "val_loss",
    "val_perplexity",
    "val_bpc",
    "lr",
    "tokens_per_second",
    "seconds",
)


def perplexity(loss):
    """exp(loss), as inf past float32's range (TensorBoard logs float32 and refuses larger values)."""
    return math.exp(loss) if loss < 88.0 else math.inf


def epoch_row(epoch, loss, val_loss, lr, tokens_per_second, seconds):
    """One history row from the two mean losses (nats per token).

    `tokens_per_second` is the training throughput (validation excluded); `seconds` is the
    whole epoch, validation included.
    """
    return {
        "epoch": epoch,
        "loss": loss,
        "perplexity": perplexity(loss),
        "bpc": loss / math.log(2),
        "val_loss": val_loss,
        "val_perplexity": perplexity(val_loss),
        "val_bpc": val_loss / math.log(2),
        "lr": lr,
        "tokens_per_second": tokens_per_second,
        "seconds": seconds,
    }


def write_csv(path, rows, level):
    """Write the rows; bits per character only at char level, where they mean that."""
    columns = [c for c in COLUMNS if level == "char" or "bpc" not in c]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def plot_curves(path, rows, title):
    """Loss (train and validation) and learning rate against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot(epochs, [r["loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.semilogy(epochs, [r["lr"] for r in rows], "o-", color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
