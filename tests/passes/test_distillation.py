"""Knowledge distillation: a student derived from the digits CNN (or given as a file) learns the
teacher's softened class scores and keeps its accuracy; an encoder's student learns its
embeddings by cosine; a student whose outputs are not shaped like the teacher's is refused
before any training, and through the optimizer nothing is registered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optiserve.core.errors import ConfigError
from optiserve.passes import Artifact, PassContext, PassSkipped, get_pass
# images is a fixture: shared, not re-defined here
from tests.passes.test_structured_pruning import (as_program, images, make_cnn,  # noqa: F401
                                                  register, rows, trained, weights)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.fixture(scope="module")
def teacher(images):
    return trained(make_cnn(), images.x_train, images.y_train, epochs=15)


@pytest.fixture(scope="module")
def teacher_artifact(teacher, images, tmp_path_factory) -> Artifact:
    x = torch.from_numpy(images.x_train[:2])
    return register(as_program(teacher, x), tmp_path_factory.mktemp("teacher"))


def distil(artifact: Artifact, settings, workdir: Path, training, **options) -> Artifact:
    cls = get_pass("distillation")
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, settings=settings, sample={}, training=training)
    return cls().run(artifact, cls.parse_config(options), ctx)


def accuracy(path_or_net, x: np.ndarray, y: np.ndarray) -> float:
    net = path_or_net if isinstance(path_or_net, nn.Module) else \
        torch.export.load(str(path_or_net)).module()
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).numpy().argmax(1) == y).mean())


@pytest.mark.slow
def test_student_derived_from_the_teacher_keeps_its_accuracy(tmp_path, settings, images,
                                                              teacher, teacher_artifact):
    out = distil(teacher_artifact, settings, tmp_path / "wd",
                 rows(images.x_train, images.y_train), width=0.5, round_to=16, steps=300)
    assert out.format == "pt2" and out.passes[-1]["name"] == "distillation"
    shapes = weights(out.path)
    assert shapes["4.weight"] == (16, 16, 3, 3) and shapes["8.weight"] == (32, 64)
    note = out.notes[-1]
    assert "student derived from the teacher at width 0.5 (teacher weights, channels '4' " \
           "32 -> 16, '8' 64 -> 32)" in note
    assert "300 steps (KL at T=4 x 0.7 + cross-entropy on the labels x 0.3, 1400 rows" in note
    assert "parameters 13,706 -> 4,890" in note
    acc_teacher = accuracy(teacher, images.x_val, images.y_val)
    assert acc_teacher > 0.93
    assert accuracy(out.path, images.x_val, images.y_val) >= acc_teacher - 0.02
    for batch in (1, 7):
        assert torch.export.load(str(out.path)).module()(
            torch.from_numpy(images.x_val[:batch])).shape == (batch, 10)


@pytest.mark.slow
def test_random_student_learns_from_soft_labels_alone(tmp_path, settings, images, teacher,
                                                       teacher_artifact):
    out = distil(teacher_artifact, settings, tmp_path / "wd", rows(images.x_train), width=0.5,
                 round_to=16, init="random", loss="kl", steps=500)
    note = out.notes[-1]
    assert "(random weights" in note and "KL at T=4 (no labels: soft targets only)" in note
    assert accuracy(out.path, images.x_val, images.y_val) >= 0.85


class Student(nn.Module):
    """A small MLP student for the CNN teacher: 64 pixels -> 32 -> `classes`."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, classes)

    def forward(self, input):
        return self.fc2(torch.relu(self.fc1(input.flatten(1))))


@pytest.mark.slow
def test_a_student_given_as_a_file_is_trained(tmp_path, settings, images, teacher_artifact):
    from optiserve.passes.distillation import save_student

    torch.manual_seed(0)
    path = save_student(Student(), torch.from_numpy(images.x_train[:2]), tmp_path / "s.pt2")
    out = distil(teacher_artifact, settings, tmp_path / "wd",
                 rows(images.x_train, images.y_train), student=str(path), steps=500)
    assert "student s.pt2 (pt2, as given)" in out.notes[-1]
    assert "parameters 13,706 -> 2,410" in out.notes[-1]
    assert weights(out.path) == {"fc1.weight": (32, 64), "fc1.bias": (32,),
                                 "fc2.weight": (10, 32), "fc2.bias": (10,)}
    assert accuracy(out.path, images.x_val, images.y_val) >= 0.85


class EmbeddingEncoder(nn.Module):
    """An encoder: 64 features -> 256 -> 256 -> a 32-d embedding (no classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                                 nn.Linear(256, 32))

    def forward(self, x):
        return self.net(x)


@pytest.mark.slow
def test_an_encoders_embeddings_are_distilled_by_cosine(tmp_path, settings, digits):
    torch.manual_seed(0)
    encoder = EmbeddingEncoder().eval()
    art = register(encoder, tmp_path / "model", (torch.from_numpy(digits.X_train[:2]),))
    out = distil(art, settings, tmp_path / "wd", rows(digits.X_train, name="x"), width=0.25,
                 round_to=8, loss="cosine", steps=400)
    note = out.notes[-1]
    assert "'net.0' 256 -> 64, 'net.2' 256 -> 64" in note
    assert "cosine distance to the teacher's outputs" in note
    with torch.no_grad():
        ref = encoder(torch.from_numpy(digits.X_val)).numpy()
        got = torch.export.load(str(out.path)).module()(torch.from_numpy(digits.X_val)).numpy()
    assert got.shape == ref.shape == (len(digits.X_val), 32)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.mean() > 0.98, cos.mean()


# -- a student that does not fit ----------------------------------------------------------------
def test_a_student_of_another_output_shape_is_refused_naming_both(tmp_path, settings, images,
                                                                   teacher_artifact):
    from optiserve.passes.distillation import save_student

    path = save_student(Student(classes=5), torch.from_numpy(images.x_train[:2]),
                        tmp_path / "five.pt2")
    with pytest.raises(ConfigError, match=r"student's outputs have shapes \[\[2, 5\]\]; the "
                       r"teacher's have \[\[2, 10\]\].*same number of classes"):
        distil(teacher_artifact, settings, tmp_path / "wd",
               rows(images.x_train, images.y_train), student=str(path))
    assert not list((tmp_path / "wd").iterdir())  # nothing written


@pytest.mark.slow
def test_through_optimize_a_mismatched_student_fails_the_run_and_stores_nothing(
        tmp_path, sqlite_registry, digits, digits_net):
    from optiserve import api
    from optiserve.passes.distillation import save_student

    api.register("digits", digits_net, registry=sqlite_registry,
                 example_inputs=(torch.from_numpy(digits.X_train[:2]),))
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    path = save_student(student, torch.from_numpy(digits.X_train[:2]), tmp_path / "s.pt2")
    np.savez(tmp_path / "train.npz", x=digits.X_train, label=digits.y_train)
    with pytest.raises(ConfigError, match=r"outputs have shapes \[\[2, 3\]\]; the teacher's "
                       r"have \[\[2, 10\]\]"):
        api.optimize("digits", registry=sqlite_registry, optimizations=["distillation"],
                     pass_configs={"distillation": {"student": str(path)}},
                     training_dataset={"source": "file", "path": str(tmp_path / "train.npz"),
                                       "label_column": "label"},
                     iterations=5, warmup=0)
    assert [v.version for v in sqlite_registry.versions("digits")] == [1]
    run = sqlite_registry.runs.list()[0]
    assert run["status"] == "failed" and "the teacher's have [[2, 10]]" in run["error"]


@pytest.mark.slow
def test_through_optimize_a_student_module_is_trained(tmp_path, sqlite_registry, digits,
                                                      digits_net):
    """From Python the student is an nn.Module: the API writes it as a program for the pass."""
    from optiserve import api

    api.register("digits", digits_net, registry=sqlite_registry,
                 example_inputs=(torch.from_numpy(digits.X_train[:2]),))
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    np.savez(tmp_path / "data.npz", x=digits.X_train, label=digits.y_train)
    data = {"source": "file", "path": str(tmp_path / "data.npz"), "label_column": "label"}
    result = api.optimize("digits", registry=sqlite_registry, optimizations=["distillation"],
                          pass_configs={"distillation": {"student": student, "steps": 200}},
                          training_dataset=data, validation_dataset=data,
                          accuracy_threshold=0.8, iterations=5, warmup=0)
    distilled = [c for c in result.candidates if c.artifact.label.startswith("distillation")]
    assert distilled and "student student.pt2" in " ".join(distilled[0].artifact.notes)
    assert distilled[0].evaluation.value > 0.8


def test_a_student_path_that_is_no_file_is_refused(tmp_path, settings, images,
                                                   teacher_artifact):
    with pytest.raises(ConfigError, match=r"student '.*missing.pt2' is not a file"):
        distil(teacher_artifact, settings, tmp_path / "wd", rows(images.x_train),
               student=str(tmp_path / "missing.pt2"))


def test_kl_on_an_output_that_is_no_class_scores_is_skipped(tmp_path, settings, digits):
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
    art = register(net, tmp_path / "model", (torch.from_numpy(digits.X_train[:2]),))
    with pytest.raises(PassSkipped, match=r"loss kl needs one 2-D output of class scores; the "
                       r"teacher gives \[\[1400, 1\]\]"):
        distil(art, settings, tmp_path / "wd", rows(digits.X_train), loss="kl", round_to=8)
