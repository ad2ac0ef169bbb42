"""Run configuration: one set of dataclasses shared by train, export and sample.

`config.json` in a run directory is `RunConfig.to_dict()`; it holds everything needed to rebuild
the model without the corpus (the vocabulary lives beside it in `vocab.json`).
"""

import dataclasses
import json
import math
import typing

from keraslm import cells
from keraslm.errors import ArgumentError, UsageError, first_line
from keraslm.files import write_text_atomic
from keraslm.sampling import check_temperature

CELLS = tuple(cells.CELLS)
LEVELS = ("char", "word")
DEFAULT_LEVEL = "char"
OPTIMIZERS = ("sgd", "adam", "adamw")
INITS = ("keras", "torch")
KERNELS = ("keraslm", "keras")  # keraslm.keras_compat
STRATEGIES = ("default", "mirrored", "multi-worker")  # keraslm.distribute
# The largest model keraslm builds: 2^31 parameters are 8 GiB of float32 weights, and training
# needs about four times that (gradients and Adam's two slots) before any activation. A larger
# setting is a typo, or a damaged config.json, and would only end in an out-of-memory crash.
MAX_PARAMETERS = 2**31
# The sample printed after each epoch is for reading: more is a typo that would fail after an epoch.
MAX_SAMPLE_TOKENS = 100_000

# The settings whose default depends on the level; every other default is its field's below. Word
# level follows pytorch/examples' word_language_model (its README's medium-size recipe); char level
# is a 2×256 LSTM that reaches ≤ 1.45 nats/char on Tiny Shakespeare within its 12 epochs
# (benchmarks/RESULTS.md, "The default run with pytorch/examples' initialisation").
LEVEL_DEFAULTS = {
    "char": dict(
        embedding_dim=128, hidden_dim=256, dropout=0.1, batch_size=32, bptt=100, epochs=12, optimizer="adam", lr=2e-3
    ),
    "word": dict(
        embedding_dim=200, hidden_dim=200, dropout=0.2, batch_size=20, bptt=35, epochs=40, optimizer="sgd", lr=20.0
    ),
}
# The fields' own defaults are DEFAULT_LEVEL's, so that RunConfig() is what train.py runs without flags.
_LEVEL = LEVEL_DEFAULTS[DEFAULT_LEVEL]


@dataclasses.dataclass
class ModelConfig:
    """The network: embedding → dropout → stacked recurrent layers → dropout → logits.

    Args:
        vocabulary_size: number of tokens, set from the vocabulary.
        cell: one of `CELLS`.
        num_layers: stacked recurrent layers.
        embedding_dim: embedding width (ignored with `one_hot`).
        hidden_dim: units of every recurrent layer.
        dropout: dropout rate after the embedding, between layers and before the projection.
        tie_weights: share the embedding matrix with the output projection.
        one_hot: feed one-hot vectors instead of a learned embedding.
        init: "keras" (Keras' default initialisers) or "torch" (pytorch/examples').

    A model has at most `MAX_PARAMETERS` (2^31) parameters; `validate` refuses a larger one. The
    defaults are a char-level run's; `RunConfig.for_level` gives another level's.
    """

    vocabulary_size: int = 0
    cell: str = "lstm"
    num_layers: int = 2
    embedding_dim: int = _LEVEL["embedding_dim"]
    hidden_dim: int = _LEVEL["hidden_dim"]
    dropout: float = _LEVEL["dropout"]
    tie_weights: bool = False
    one_hot: bool = False
    # pytorch/examples' at both levels: it learns faster than Keras' defaults at both levels
    # (benchmarks/RESULTS.md, "Figures from code comments").
    init: str = "torch"

    def num_parameters(self):
        """The parameter count of the models `keraslm.model` builds from this config
        (tests check it against Keras' own count); a vocabulary size of 0 counts no embedding or output."""
        vocabulary, hidden = self.vocabulary_size, self.hidden_dim
        layer = cells.CELLS[self.cell].num_parameters
        first_inputs = vocabulary if self.one_hot else self.embedding_dim
        embedding = 0 if self.one_hot else vocabulary * self.embedding_dim
        output = vocabulary if self.tie_weights else (hidden + 1) * vocabulary  # tied: only the output bias
        return embedding + layer(first_inputs, hidden) + (self.num_layers - 1) * layer(hidden, hidden) + output

    def validate(self):
        """Raise ArgumentError, naming the field, on a setting the model cannot be built with."""
        _one_of("cell", self.cell, CELLS)
        _one_of("init", self.init, INITS)
        _positive("num_layers", self.num_layers)
        _positive("hidden_dim", self.hidden_dim)
        if not self.one_hot:
            _positive("embedding_dim", self.embedding_dim)
        if not 0.0 <= self.dropout < 1.0:
            raise ArgumentError.about("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.tie_weights and self.one_hot:
            raise ArgumentError("{tie_weights} needs a learned embedding; drop {one_hot}")
        if self.tie_weights and self.embedding_dim != self.hidden_dim:
            raise ArgumentError(
                "{tie_weights} needs {embedding_dim} equal to {hidden_dim} (got {embedding} and {hidden});"
                " set them equal",
                embedding=self.embedding_dim,
                hidden=self.hidden_dim,
            )
        parameters = self.num_parameters()
        if parameters > MAX_PARAMETERS:
            raise ArgumentError(
                "{num_layers} {layers}, {hidden_dim} {hidden}, {embedding_dim} {embedding}{vocabulary} make"
                " {parameters:,} parameters, over keraslm's limit of 2^31; make the model smaller",
                layers=self.num_layers,
                hidden=self.hidden_dim,
                embedding=self.embedding_dim,
                vocabulary=f" and {self.vocabulary_size:,} tokens" if self.vocabulary_size else "",
                parameters=parameters,
            )


@dataclasses.dataclass
class DataConfig:
    """Where the corpus comes from and how it is tokenised.

    Args:
        source: `tfds:NAME`, a directory with train/valid/test.txt, or one text file.
        level: `char` or `word`.
        min_freq: word level: words seen fewer times in training become `<unk>`.
        max_vocab: word level: keep at most this many tokens (0 = no limit).
        tfds_manual_dir: where TFDS finds an already-downloaded source file.
        tfds_data_dir: where TFDS keeps prepared datasets.
        encoding: text encoding of corpus files.
    """

    source: str = "tfds:tiny_shakespeare"
    level: str = DEFAULT_LEVEL
    min_freq: int = 1
    max_vocab: int = 0
    tfds_manual_dir: str | None = None
    tfds_data_dir: str | None = None
    encoding: str = "utf-8"

    def validate(self):
        """Raise ArgumentError, naming the field, on an unusable setting."""
        _one_of("level", self.level, LEVELS)
        _positive("min_freq", self.min_freq)
        if self.max_vocab < 0:
            raise ArgumentError.about("max_vocab", f"must be >= 0 (0 = no limit), got {self.max_vocab}")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and bookkeeping.

    Args:
        batch_size: TBPTT columns, i.e. independent streams carried in parallel.
        bptt: window length in tokens (backpropagation through time is truncated here).
        epochs: passes over the training stream.
        optimizer: one of `OPTIMIZERS`.
        lr: initial learning rate.
        clipnorm: clip gradients by their global norm (0 = off), as torch's clip_grad_norm_.
        weight_decay: AdamW's decoupled weight decay.
        anneal_factor: divide the learning rate by this when validation loss does not improve.
        early_stopping: stop after this many epochs without improvement (0 = off).
        seed: seeds Python, NumPy and TensorFlow.
        jit_compile: compile the train step with XLA.
        mixed_precision: float16 compute on a GPU (bfloat16 on a CPU), float32 logits and loss.
            None (the default) decides when training starts: on where the CPU has AMX bfloat16
            units and there is no GPU (training.bfloat16_is_native), off otherwise.
        sample_prompt: prompt of the sample printed after each epoch ("" = start token).
        sample_tokens: tokens sampled after each epoch (0 = off).
        sample_temperature: temperature of that sample.
        kernels: "keraslm" (per-replica state, window kernels on a CPU, torch's clipping; needs
            the private Keras APIs of keraslm.keras_compat) or "keras" (plain Keras stateful layers
            and optimizers: slower, one replica). A new run takes "keras" when this Keras changed
            those APIs. Checkpoints name layers by class, so a run resumes only on its own kernels.

    The defaults are a char-level run's; `RunConfig.for_level` gives another level's.
    """

    batch_size: int = _LEVEL["batch_size"]
    bptt: int = _LEVEL["bptt"]
    epochs: int = _LEVEL["epochs"]
    optimizer: str = _LEVEL["optimizer"]
    lr: float = _LEVEL["lr"]
    clipnorm: float = 0.25
    weight_decay: float = 0.01
    anneal_factor: float = 4.0
    early_stopping: int = 0
    seed: int = 1111
    jit_compile: bool = False
    mixed_precision: bool | None = None
    sample_prompt: str = ""
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    kernels: str = "keraslm"

    def validate(self):
        """Raise ArgumentError, naming the field, on an unusable setting."""
        _positive("batch_size", self.batch_size)
        _positive("bptt", self.bptt)
        _positive("epochs", self.epochs)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ArgumentError.about("lr", f"must be a positive number, got {self.lr}")
        if not self.clipnorm >= 0:
            raise ArgumentError.about("clipnorm", f"must be >= 0 (0 = off), got {self.clipnorm}")
        if not self.anneal_factor >= 1:
            raise ArgumentError.about("anneal_factor", f"must be >= 1 (1 = off), got {self.anneal_factor}")
        if self.early_stopping < 0:
            raise ArgumentError.about("early_stopping", f"must be >= 0, got {self.early_stopping}")
        if not 0 <= self.seed < 2**32:  # NumPy's seeds are 32-bit
            raise ArgumentError.about("seed", f"must be in [0, 2^32), got {self.seed}")
        if not 0 <= self.sample_tokens <= MAX_SAMPLE_TOKENS:
            raise ArgumentError.about("sample_tokens", f"must be in [0, {MAX_SAMPLE_TOKENS}], got {self.sample_tokens}")
        # Checked now by the sampling rule, not after the first epoch when the sample is drawn.
        check_temperature(self.sample_temperature, "sample_temperature")
        _one_of("kernels", self.kernels, KERNELS)


@dataclasses.dataclass
class RunConfig:
    """Everything a run was made with; written as config.json.

    `RunConfig()` holds the defaults of a char-level run and `RunConfig.for_level("word")` those of
    a word-level one: what train.py runs with when no flag is given.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @classmethod
    def for_level(cls, level=DEFAULT_LEVEL):
        """The defaults of a run at `level` ("char" or "word")."""
        _one_of("level", level, LEVELS)
        config = cls(data=DataConfig(level=level))
        for name, value in LEVEL_DEFAULTS[level].items():
            setattr(getattr(config, cls.section_of(name)), name, value)
        return config

    @staticmethod
    def section_of(name):
        """The section ("model", "data" or "train") that holds the setting `name`; no two share a name."""
        for section in dataclasses.fields(RunConfig):
            if name in {f.name for f in dataclasses.fields(section.default_factory)}:
                return section.name
        raise KeyError(name)

    def validate(self):
        """Validate every section; raise UsageError on the first problem."""
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self):
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Rebuild from `to_dict()` output, every value checked against its field's annotation.

        A missing section or an unknown field is an error; a missing field takes its default (a
        run written before the field existed). Messages name the field ("model.hidden_dim").
        """
        if isinstance(d, dict):
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in d]
            if missing:
                raise UsageError(f"no section {', '.join(missing)}; it does not match this version of keraslm")
        return _from_dict(cls, d, "")

    def save(self, path):
        """Write config.json atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path):
        """Read config.json; a missing or malformed file is a UsageError."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"{path} not found: is this a keraslm run directory?") from None
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an integer of over 4300 digits, too deep
            raise UsageError(f"{path} is not valid JSON ({first_line(e)}); the run directory is damaged") from None
        try:
            config = cls.from_dict(d)
            if config.model.vocabulary_size < 1:  # set from the vocabulary before config.json is written
                raise UsageError(f"model.vocabulary_size must be positive, got {config.model.vocabulary_size}")
            return config.validate()
        except UsageError as e:  # str(): the file holds fields, so they are named as fields, not flags
            raise UsageError(f"{path}: {e}; the run directory is damaged") from None


def _positive(name, value):
    if not value > 0:
        raise ArgumentError.about(name, f"must be a positive number, got {value}")


def _one_of(name, value, choices):
    if value not in choices:
        raise ArgumentError.unknown(name, value, choices)


def _finite_number(value):
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


# What a JSON value must be to fill a field of each annotated type, and how messages say it.
# bool is told apart from int because JSON's true is a Python int too.
_KINDS = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (_finite_number, "a finite number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    type(None): (lambda v: v is None, "null"),
}


def _from_dict(cls, d, where):
    """`cls(**d)` for a dataclass, after checking each value against its field's annotation (one
    of `_KINDS`, `X | None`, or a nested dataclass, built the same way); `where` prefixes names."""
    if not isinstance(d, dict):
        raise UsageError(f"{where.rstrip('.') or 'the config'} must be a JSON object, got {_quote(d)}")
    annotations = typing.get_type_hints(cls)
    unknown = [key for key in d if key not in annotations]
    if unknown:
        raise UsageError(f"unknown setting {_quote(where + unknown[0])}; it does not match this version of keraslm")
    values = {}
    for name, value in d.items():
        annotation = annotations[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _from_dict(annotation, value, f"{where}{name}.")
            continue
        kinds = typing.get_args(annotation) or (annotation,)  # `str | None` → (str, NoneType)
        if not any(_KINDS[kind][0](value) for kind in kinds):
            expected = " or ".join(_KINDS[kind][1] for kind in kinds)
            raise UsageError(f"{where}{name} must be {expected}, got {_quote(value)}")
        values[name] = value
    return cls(**values)


def _quote(value, limit=40):
    text = repr(value)  # a string's newlines stay escaped: the message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."
