"""The recipe schemas of the text-encoder tasks, text_classification and embedding, and the sections they share
(texts, encoder teacher, encoder student, evaluation).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.recipe.common import (
    LOG_WITH_HELP,
    MAX_LR,
    DistillSpec,
    FromTeacher,
    LogWith,
    PositiveOrAuto,
    Seed,
    Strict,
    StudentTrainSpec,
    TrainSpec,
    auto_needs_validation,
    exactly_one_of,
    patience_needs_validation,
)


class TextDataSpec(Strict):
    source: Literal["20newsgroups", "rotten_tomatoes", "csv", "jsonl"] = "20newsgroups"
    path: str | None = Field(
        default=None,
        description="20newsgroups / rotten_tomatoes: default the fetched copy in ~/.cache/distill; csv / jsonl: a "
        "folder with train.csv and test.csv (or train.jsonl and test.jsonl); an empty label = unlabeled",
    )
    text_column: str = "text"
    label_column: str = "label"
    labeled_fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="stratified part that keeps labels")
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="rotten_tomatoes: held-out share")
    limit_train: int | None = Field(default=None, gt=0)
    limit_test: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=128, ge=2, description="tokens per text, special tokens included")
    validation_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=0.5,
        description="text_classification: labeled training texts held out (seeded, per class) to validate the "
        "students and check the teacher; embedding: a seeded random part of each source's training texts (labeled "
        "or not), never trained on, to validate the student against the teacher's embeddings; 0: none",
    )
    clauses: bool = Field(
        default=False,
        description="embedding task: also distill on the clauses of each training text (split at , ; : ( ) -- "
        "and sentence ends, 3+ words each), extra unlabeled texts the teacher embeds",
    )


class EncoderTeacherSpec(Strict):
    path: str = Field(default="~/.cache/distill/all-mpnet-base-v2", description="HF / sentence-transformers folder")
    probe_c: PositiveOrAuto = Field(
        default="auto",
        description="inverse L2 strength of the logistic-regression head; auto: chosen by 5-fold cross-validation "
        "(log loss) on the labeled training texts",
    )


class EncoderTrainSpec(TrainSpec):
    """Fine-tuning a pretrained encoder: AdamW at a transformer's learning rate, early stop on validation."""

    epochs: int = Field(default=15, gt=0, description="at most; early stop (patience) usually ends it sooner")
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=1e-4, gt=0.0, le=MAX_LR)
    batch_size: int = Field(default=16, gt=0)
    patience: int | None = Field(default=3, gt=0, description="validations (one per epoch) without a better loss")


class ClassifierTeacherSpec(EncoderTeacherSpec):
    """The text classifier's teacher: an HF sequence-classification folder used as it is, or an encoder given a
    head — fine-tuned on the labeled texts (``train``) or, cheapest, a frozen-encoder probe (``probe``)."""

    path: str = Field(
        default="~/.cache/distill/all-mpnet-base-v2",
        description="an HF sequence-classification folder (its id2label names the classes), or an HF / "
        "sentence-transformers encoder folder with train or probe",
    )
    train: EncoderTrainSpec | None = Field(
        default=None,
        description="fine-tune the teacher (encoder + classification head) on the labeled training texts first "
        "(stage 'teacher': best validation loss kept, early stop, checkpointed and resumable); its logits are "
        "cached under its weights' id",
    )
    probe: bool = Field(
        default=False,
        description="the cheapest teacher: the frozen encoder's pooled outputs + a logistic-regression head fitted "
        "on the labeled texts (C: probe_c)",
    )

    @model_validator(mode="after")
    def _one_head(self) -> ClassifierTeacherSpec:
        if self.train is not None and self.probe:
            raise ValueError("teacher: choose one head, train (fine-tune the encoder) or probe (frozen encoder)")
        return self


class StaticSpec(Strict):
    pca_dims: int | None = Field(default=256, gt=0, description="PCA width of the token vectors; null keeps all")
    sif: float = Field(default=1e-3, gt=0.0, description="SIF weight a/(a+p(token)) from training-text counts")
    epochs: int = Field(
        default=0,
        ge=0,
        description="then fine-tune the vectors to reproduce the teacher's embeddings of the training texts (MSE, "
        "Tokenlearn-style); needs pca_dims: null",
    )
    lr: float = Field(default=1e-2, gt=0.0, le=MAX_LR)
    batch_size: int = Field(default=128, gt=0)

    @model_validator(mode="after")
    def _trained_in_teacher_space(self) -> StaticSpec:
        if self.epochs and self.pca_dims is not None:
            raise ValueError("epochs > 0 trains the vectors against the teacher's embeddings: set pca_dims: null")
        return self


class EncoderStudentSpec(Strict):
    path: str | None = Field(default=None, description="HF / sentence-transformers folder of the starting weights")
    from_teacher: FromTeacher | None = None
    static: StaticSpec | None = Field(default=None, description="embedding task: one vector per token, no transformer")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    train: StudentTrainSpec = Field(default_factory=lambda: StudentTrainSpec(optimizer="adamw", lr=1e-4, batch_size=32))

    @model_validator(mode="after")
    def _one_source(self) -> EncoderStudentSpec:
        return exactly_one_of(self, "path", "from_teacher", "static")


class TextEvalSpec(Strict):
    threads: int = Field(default=1, gt=0, description="CPU threads for latency and throughput")
    batch_size: int = Field(default=32, gt=0, description="texts per batch for the throughput figure")


class TextClassificationRecipe(Strict):
    task: Literal["text_classification"]
    name: str = "run"
    seed: Seed = 0
    log_with: LogWith = Field(default_factory=list, description=LOG_WITH_HELP)
    data: TextDataSpec = Field(default_factory=lambda: TextDataSpec(labeled_fraction=0.1))
    teacher: ClassifierTeacherSpec = Field(default_factory=lambda: ClassifierTeacherSpec(probe=True))
    student: EncoderStudentSpec = Field(
        default_factory=lambda: EncoderStudentSpec(path="~/.cache/distill/all-minilm-l6-v2")
    )
    distill: DistillSpec = Field(default_factory=lambda: DistillSpec(temperature=2.0))
    baseline: bool = Field(default=True, description="also train the student on the labeled part, same step count")
    eval: TextEvalSpec = Field(default_factory=TextEvalSpec)

    @model_validator(mode="after")
    def _embedding_only_options(self) -> TextClassificationRecipe:
        auto_needs_validation(self.distill, self.student.train, self.data.validation_fraction)
        if self.teacher.train is not None and self.data.validation_fraction == 0:
            raise ValueError(
                "teacher.train keeps the teacher's best weights on the validation split: set "
                "data.validation_fraction > 0 (e.g. 0.1)"
            )
        if self.student.static is not None:
            raise ValueError("student.static is for task: embedding; a classifier student needs path or from_teacher")
        if self.data.clauses:
            raise ValueError("data.clauses is for task: embedding; a classifier learns from whole texts")
        return self


class EmbedDistillSpec(Strict):
    loss: Literal["mse", "cosine", "mse+cosine"] = "mse"
    token_states: float = Field(
        default=0.0,
        ge=0,
        description="weight of a second loss on the teacher's last-layer token states (MSE of unit vectors per "
        "token, the scale of the sentence MSE); needs a transformer student that tokenizes like the teacher",
    )
    cache_dir: str | None = Field(default=None, description="teacher embeddings; default RUN/cache")


class EmbeddingRecipe(Strict):
    task: Literal["embedding"]
    name: str = "run"
    seed: Seed = 0
    log_with: LogWith = Field(default_factory=list, description=LOG_WITH_HELP)
    data: list[TextDataSpec] = Field(
        default_factory=lambda: [TextDataSpec(source="rotten_tomatoes")],
        description="training texts (train split) and held-out texts (test split); the labels feed linear probes",
    )
    teacher: EncoderTeacherSpec = Field(default_factory=EncoderTeacherSpec)
    student: EncoderStudentSpec = Field(default_factory=lambda: EncoderStudentSpec(from_teacher=FromTeacher(keep=4)))
    distill: EmbedDistillSpec = Field(default_factory=EmbedDistillSpec)
    eval: TextEvalSpec = Field(default_factory=TextEvalSpec)

    @model_validator(mode="after")
    def _token_states_need_a_transformer(self) -> EmbeddingRecipe:
        if self.distill.token_states and self.student.static is not None:
            raise ValueError("distill.token_states needs a transformer student; a static table has no token states")
        return self

    @model_validator(mode="after")
    def _selected_by_loss(self) -> EmbeddingRecipe:
        train = self.student.train
        if train.select_by != "loss":  # accuracy, kl and agreement need classes or logits; embeddings have neither
            raise ValueError(
                f"student.train.select_by {train.select_by!r} has nothing to measure in task: embedding (no classes, "
                "no logits); use select_by: loss, the distance to the teacher's embeddings of the validation texts"
            )
        patience_needs_validation("student", train, any(spec.validation_fraction for spec in self.data))
        if train.lr == "auto":
            raise ValueError(
                "student.train.lr: auto is for classification and text_classification recipes; give a number"
            )
        return self
