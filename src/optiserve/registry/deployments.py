"""Deployments: what the inference server serves under a name, and how.

A deployment names a registered model, a version policy (the latest N ready versions, or
specific ones) and the serving settings of each version: dynamic batching, queue bound,
timeout, instances and their threads; and, optionally, what `POST
/api/v1/models/{name}/predict` does around the model (`PredictSpec`: image preprocessing,
softmax, top-k labels). Servers load every deployment when they start and on
`POST /v2/repository/models/{name}/load`; a model cannot be deleted while it is deployed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from optiserve.core.errors import ConfigError, ModelNotFound, OptiserveError
from optiserve.core.types import Signature, TensorSpec
from optiserve.registry.tables import (DeploymentRow, ModelRow, check_model_name, lock_model,
                                      utcnow)


class DeploymentNotFound(OptiserveError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"No deployment '{name}'.",
            hint=(f"Deployments: {', '.join(sorted(known))}." if known else "None exist yet.")
            + f" Create one with: optiserve deploy {name}")
        self.name = name


class VersionPolicy(BaseModel):
    """Which versions serve: the latest N ready ones (default 1), or a list of numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: int | None = Field(None, ge=1, le=16, description="Serve the newest N ready versions.")
    specific: list[int] | None = Field(None, min_length=1, max_length=16,
                                       description="Serve exactly these version numbers.")

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        if self.latest is not None and self.specific is not None:
            raise ValueError("give either 'latest' or 'specific', not both")
        if self.latest is None and self.specific is None:
            object.__setattr__(self, "latest", 1)
        return self

    def describe(self) -> str:
        return f"latest {self.latest}" if self.specific is None else \
            "versions " + ", ".join(map(str, self.specific))


_Side = Annotated[int, Field(ge=1, le=16384)]
_Finite = Annotated[float, Field(allow_inf_nan=False)]


class ImageSpec(BaseModel):
    """How an uploaded image becomes the model's input tensor, in torchvision's order:
    EXIF orientation applied, converted to `color`, resized, center-cropped, times `scale`,
    minus `mean`, divided by `std`, laid out as `layout` with a batch dimension of 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: _Side | tuple[_Side, _Side] | None = Field(
        None, description="An integer resizes the shorter side to it (aspect ratio kept); "
        "[height, width] resizes to exactly that. Default: no resize, unless the model's "
        "input has a fixed height and width and no crop is set, then it is resized to them.")
    crop: tuple[_Side, _Side] | None = Field(
        None, description="Center crop [height, width] after the resize.")
    color: Literal["RGB", "L"] = Field("RGB", description="Channels: RGB (3) or L (grayscale, "
                                       "1).")
    scale: _Finite = Field(1 / 255, gt=0, description="Pixel values (0..255) are multiplied by "
                         "this first; default 1/255 gives 0..1.")
    mean: tuple[_Finite, ...] | None = Field(None, description="Subtracted per channel after "
                                           "scaling, e.g. [0.485, 0.456, 0.406].")
    std: tuple[_Finite, ...] | None = Field(None, description="Divided per channel after the "
                                          "mean, e.g. [0.229, 0.224, 0.225].")
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="Dimension order of the "
                                            "model's image input.")
    dtype: Literal["float32", "float16", "uint8"] = Field(
        "float32", description="Element type of the model's image input (uint8: raw pixels, "
        "with scale 1 and no mean/std).")

    @property
    def channels(self) -> int:
        return 3 if self.color == "RGB" else 1

    @model_validator(mode="after")
    def _consistent(self) -> ImageSpec:
        for field in ("mean", "std"):
            values = getattr(self, field)
            if values is not None and len(values) != self.channels:
                raise ValueError(f"'{field}' has {len(values)} values but color "
                                 f"{self.color} has {self.channels} channel(s)")
        if self.std is not None and any(not v > 0 for v in self.std):
            raise ValueError("every 'std' value must be positive")
        if self.dtype == "uint8" and (self.scale != 1 or self.mean or self.std):
            raise ValueError("dtype uint8 takes raw pixels: set scale 1 and no mean/std")
        if self.crop is not None and self.resize is not None:
            room = (self.resize, self.resize) if isinstance(self.resize, int) else self.resize
            if self.crop[0] > room[0] or self.crop[1] > room[1]:
                raise ValueError(f"crop {list(self.crop)} is larger than the resized image "
                                 f"({self.resize}; an integer is the shorter side)")
        return self

    def size(self) -> tuple[int, int] | None:
        """The (height, width) every image ends up with, when the settings fix it."""
        if self.crop is not None:
            return tuple(self.crop)
        if self.resize is not None and not isinstance(self.resize, int):
            return tuple(self.resize)
        return None


class PredictSpec(BaseModel):
    """What `POST /api/v1/models/{name}/predict` does around the model: how an image is
    turned into its input, and how an output becomes class scores and labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageSpec | None = Field(None, description="Image preprocessing; without it the "
                                    "endpoint takes JSON only.")
    input: str | None = Field(None, description="Model input an image is fed to; default: "
                              "the model's only input.")
    output: str | None = Field(None, description="Output to post-process (softmax, top_k); "
                               "default: the first. Without softmax/top_k every output is "
                               "returned as is.")
    softmax: bool = Field(False, description="Turn the output's scores (logits) into "
                          "probabilities along its last dimension.")
    top_k: int | None = Field(None, ge=1, le=1000, description="Return the k best classes "
                              "per row, best first, as {label, index, score}; default 5 (at "
                              "most the number of labels) when labels are given, else none.")
    labels: list[Annotated[str, Field(max_length=1000)]] | None = Field(
        None, min_length=1, max_length=100_000,
        description="Class names by output index; default: the classes a scikit-learn "
        "classifier recorded, else the index as text.")

    @model_validator(mode="after")
    def _defaults(self) -> PredictSpec:
        if self.labels is not None and self.top_k is None:
            object.__setattr__(self, "top_k", min(5, len(self.labels)))
        return self

    def classifies(self) -> bool:
        """True when one output is post-processed (softmax or top-k)."""
        return self.softmax or self.top_k is not None

    def image_input(self, signature: Signature) -> str:
        if self.input is not None:
            return self.input
        if len(signature.inputs) != 1:
            raise ConfigError(
                f"The model has {len(signature.inputs)} inputs, so its predict settings must "
                "name the one an image is fed to.",
                hint="Set predict.input to one of: "
                + ", ".join(t.name for t in signature.inputs) + ".")
        return signature.inputs[0].name

    def output_name(self, signature: Signature) -> str:
        return self.output if self.output is not None else signature.outputs[0].name

    def check(self, signature: Signature) -> None:
        """These settings fit the model's signature, or a ConfigError says what does not."""
        names = [t.name for t in signature.inputs]
        outs = [t.name for t in signature.outputs]
        if self.input is not None and self.input not in names:
            raise ConfigError(f"predict.input '{self.input}' is not an input of the model.",
                              hint=f"Its inputs: {', '.join(names)}.")
        if self.output is not None and self.output not in outs:
            raise ConfigError(f"predict.output '{self.output}' is not an output of the "
                              "model.", hint=f"Its outputs: {', '.join(outs)}.")
        if self.image is not None:
            spec = signature.input(self.image_input(signature))
            _check_image(self.image, spec)
        if self.classifies():
            out = next(t for t in signature.outputs if t.name == self.output_name(signature))
            batch_1d = len(out.shape) == 1 and out.shape[0] == -1  # a label per row
            if len(out.shape) not in (1, 2) or batch_1d or out.dtype in ("str", "object"):
                raise ConfigError(
                    f"Output '{out.name}' ({out.dtype}{list(out.shape)}) is not class scores "
                    "[batch, classes], so softmax/top_k cannot apply to it.",
                    hint="Name the score output with predict.output, or drop softmax/top_k.")
            k = out.shape[-1]
            if self.labels is not None and k != -1 and len(out.shape) == 2 \
                    and len(self.labels) != k:
                raise ConfigError(f"predict.labels has {len(self.labels)} names but output "
                                  f"'{out.name}' has {k} classes.",
                                  hint="Give exactly one name per class, in index order.")


def _check_image(image: ImageSpec, spec: TensorSpec) -> None:
    shape = spec.shape
    if len(shape) not in (3, 4):
        raise ConfigError(f"Input '{spec.name}' has shape {list(shape)}; an image input has 4 "
                          "dimensions (batch, and height, width, channels in the layout) or 3.",
                          hint="Feed images to an image input with predict.input.")
    dims = shape[-3:]
    h, w, c = (dims[1], dims[2], dims[0]) if image.layout == "NCHW" else dims
    if c not in (-1, image.channels):
        raise ConfigError(f"Input '{spec.name}' {list(shape)} has {c} channels in layout "
                          f"{image.layout}; color {image.color} gives {image.channels}.",
                          hint="Set predict.image.color (RGB or L) or layout (NCHW or NHWC).")
    size = image.size()
    if size is not None and any(want not in (-1, got) for want, got in zip((h, w), size)):
        raise ConfigError(f"Images end up {size[0]}x{size[1]} (height x width) but input "
                          f"'{spec.name}' takes {h}x{w}.",
                          hint="Set predict.image.resize / crop to the model's size.")
    if spec.dtype != image.dtype:
        raise ConfigError(f"Input '{spec.name}' is {spec.dtype}; predict.image.dtype is "
                          f"{image.dtype}.", hint=f"Set predict.image.dtype to {spec.dtype}.")


class DeploymentSpec(BaseModel):
    """How one served model runs. Batching follows Triton's dynamic batcher: with
    `max_queue_delay_us` 0 an idle instance takes whatever is queued and never waits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="The registered model to serve.")
    versions: VersionPolicy = Field(default_factory=VersionPolicy,
                                    description="Which of its versions serve.")
    max_batch_size: int = Field(64, ge=0, le=4096,
                                description="Most rows run in one call; 0 turns batching off "
                                "(also off by itself when the model has no dynamic batch "
                                "dimension).")
    max_queue_delay_us: int = Field(0, ge=0, le=10_000_000,
                                    description="How long an incomplete batch may wait for "
                                    "more requests; 0 = never wait while a request is queued.")
    preferred_batch_sizes: list[int] = Field(default_factory=list, max_length=16,
                                             description="Batch sizes to cut at when more is "
                                             "queued than fits (sizes a compiled engine likes).")
    max_queue_size: int = Field(1024, ge=1, le=1_000_000,
                                description="Requests waiting per version; beyond it the "
                                "server answers 429 / RESOURCE_EXHAUSTED with Retry-After.")
    timeout_ms: int = Field(30_000, ge=0, le=3_600_000,
                            description="A request still queued after this long fails with "
                            "504 / DEADLINE_EXCEEDED; 0 = no limit.")
    instances: int = Field(1, ge=1, le=64,
                           description="Sessions per version, run in threads.")
    threads: int | None = Field(None, ge=1, le=256,
                                description="Intra-op threads per instance; default: the "
                                "machine's cores divided among the instances.")
    runtime: str | None = Field(None, description="Runtime to run the artifact with; default "
                                "the one its format runs in natively.")
    allow_nan: bool = Field(False, description="Let NaN and infinity through to the model "
                            "(for models trained with missing values); refused by default.")
    predict: PredictSpec | None = Field(None, description="Pre- and post-processing of "
                                        "POST /api/v1/models/{name}/predict (images, "
                                        "softmax, top-k labels); default: JSON in, raw "
                                        "outputs out.")

    @model_validator(mode="after")
    def _sizes(self) -> DeploymentSpec:
        bad = [s for s in self.preferred_batch_sizes
               if s < 1 or (self.max_batch_size and s > self.max_batch_size)]
        if bad:
            raise ValueError(f"preferred batch size {bad[0]} is outside 1..max_batch_size")
        return self

    def threads_per_instance(self, cores: int | None = None) -> int:
        """Instances x threads never exceed the cores (no oversubscription) unless asked."""
        cores = cores or os.cpu_count() or 1
        return self.threads or max(1, cores // self.instances)


def parse_spec(data: dict) -> DeploymentSpec:
    """A DeploymentSpec from JSON, with pydantic's errors as one readable ConfigError."""
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "deployment"
        raise ConfigError(f"Deployment setting '{where}' is invalid: {err.get('msg')}.",
                          hint="See DeploymentSpec in the API docs (/docs) for the fields."
                          ) from None


@dataclass(frozen=True)
class Deployment:
    name: str
    spec: DeploymentSpec
    created_at: datetime | None
    updated_at: datetime | None
    loaded: bool = True  # False: unloaded over the repository API, settings kept


def _info(row: DeploymentRow) -> Deployment:
    return Deployment(row.name, DeploymentSpec.model_validate(row.spec), row.created_at,
                      row.updated_at, row.loaded is not False)


class Deployments:
    def __init__(self, session: sessionmaker):
        self._session = session

    def put(self, name: str, spec: DeploymentSpec) -> Deployment:
        """Create or replace a deployment; its model must exist."""
        check_model_name(name)
        with self._session.begin() as s:
            model = lock_model(s, spec.model)  # a concurrent delete_model waits, or wins
            if model is None:
                raise ModelNotFound(spec.model, known=s.scalars(select(ModelRow.name)).all())
            row = s.get(DeploymentRow, name)
            if row is None:
                row = DeploymentRow(name=name, model_name=spec.model, created_at=utcnow())
                s.add(row)
            row.model_name, row.spec = spec.model, spec.model_dump(mode="json")
            row.updated_at, row.loaded = utcnow(), True
            s.flush()
            return _info(row)

    def get(self, name: str) -> Deployment:
        with self._session() as s:
            row = s.get(DeploymentRow, name)
            if row is None:
                raise DeploymentNotFound(name, s.scalars(select(DeploymentRow.name)).all())
            return _info(row)

    def list(self) -> list[Deployment]:
        with self._session() as s:
            return [_info(r) for r in
                    s.scalars(select(DeploymentRow).order_by(DeploymentRow.name))]

    def of_model(self, s, model: str) -> list[str]:
        """Names of the deployments that serve `model` (inside the caller's transaction)."""
        return list(s.scalars(select(DeploymentRow.name)
                              .where(DeploymentRow.model_name == model)))

    def mark_unloaded(self, name: str) -> Deployment:
        """Remember that `name` is unloaded (servers starting do not load it); its settings
        stay, and loading it again (`put`) marks it loaded."""
        with self._session.begin() as s:
            row = s.get(DeploymentRow, name)
            if row is None:
                raise DeploymentNotFound(name, s.scalars(select(DeploymentRow.name)).all())
            row.loaded, row.updated_at = False, utcnow()
            return _info(row)

    def remove(self, name: str) -> Deployment:
        with self._session.begin() as s:
            row = s.get(DeploymentRow, name)
            if row is None:
                raise DeploymentNotFound(name, s.scalars(select(DeploymentRow.name)).all())
            info = _info(row)
            s.delete(row)
            return info
