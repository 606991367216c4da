"""Where a dataset's files are: one reader per layout, all giving the same lists. [ours]

Layouts (:data:`dmdd_core.catalog.DATASETS` says which dataset uses which):

``mvtec`` (MVTec AD, MPDD, the built-in dataset)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<defect_type>/*.png             defect_type "good" for normal test images
    ROOT/<category>/ground_truth/<defect_type>/<stem>_mask.png   (no ground_truth folder: image labels only)

``folder`` (your own images): the same, for one category whose folder is ROOT itself::

    ROOT/train/good/*   ROOT/test/<defect_type>/*   ROOT/ground_truth/<defect_type>/<stem><mask_suffix>.*

``visa`` (VisA as downloaded, read through its split file, no conversion)::

    ROOT/split_csv/1cls.csv                              columns object,split,label,image,mask
    ROOT/<category>/Data/Images/{Normal,Anomaly}/*.JPG   paths in the csv are relative to ROOT
    ROOT/<category>/Data/Masks/Anomaly/*.png

VisA's split file has no defect types: its defective images get the type "anomaly".

``elpv`` (the ELPV solar-cell images of the PyPI package ``elpv-dataset``, read where the package installed them;
image labels only, no masks)::

    ROOT/labels.csv                                      lines "images/cellNNNN.png  <probability>  <mono|poly>"
    ROOT/images/cellNNNN.png                             300 x 300 grayscale electroluminescence images

ELPV's fixed split [ours]: one category per cell type (mono, poly). The cells were cut from 60-cell solar modules
and labels.csv lists them module by module, so a block of 60 consecutive lines stands for one module; train and
test come from different blocks, so no test cell has a neighbour from its own module in training. Odd blocks
(lines 61-120, 181-240, ...) are the test modules: their cells with defect probability 0 are the good test
images, those with probability 1 the defective ones (type "defective"). The probability-0 cells of even blocks
train. Cells rated 1/3 or 2/3 are left out: their label is uncertain.

Every listing is sorted, so the same files always come in the same order. Problems are reported with the file
or folder concerned and what to do about it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dmdd_core.catalog import DATASET_ALIASES, DATASET_KINDS, DATASETS, Policy
from dmdd_core.imageio import IMAGE_EXTENSIONS, is_image_file

GOOD = "good"
VISA_ANOMALY = "anomaly"


class TestItem(NamedTuple):
    """One test image on disk: its mask (None for good images, and for every image of a split with image labels
    only) and defect type."""

    image: Path
    mask: Path | None
    defect_type: str

    @property
    def label(self) -> int:
        """0 good, 1 defective."""
        return 0 if self.defect_type == GOOD else 1


TestItem.__test__ = False  # type: ignore[attr-defined]  # not a pytest test class despite its name


def image_files(folder: Path) -> list[Path]:
    """Sorted image files (by suffix, case-insensitive) directly in ``folder``."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _no_images_error(folder: Path, what: str) -> FileNotFoundError:
    if not folder.is_dir():
        return FileNotFoundError(f"no {what}: folder {folder} does not exist")
    others = sorted(p.name for p in folder.iterdir())[:5]
    hint = f" (it holds {others}; images must end in {', '.join(sorted(IMAGE_EXTENSIONS))})" if others else " (it is empty)"
    return FileNotFoundError(f"no {what} in {folder}{hint}")


@dataclass
class DataSource:
    """A dataset on disk: its categories, each category's normal training images and labelled test images."""

    root: Path
    kind: str
    """The dataset name (mvtec, mpdd, visa, builtin) or the layout name for other data (mvtec, folder)."""
    dataset: str | None = None
    """The known dataset (a key of :data:`~dmdd_core.catalog.DATASETS`) this source holds, None for data of
    one's own: it decides the rotation policy."""

    def rotation_policy(self, category: str) -> Policy:
        """The rotation policy of ``category`` in this source: its dataset's, "none" for data of one's own."""
        return DATASETS[self.dataset].rotation_policy(category) if self.dataset in DATASETS else "none"

    def categories(self) -> list[str]:
        raise NotImplementedError

    def train_images(self, category: str) -> list[Path]:
        raise NotImplementedError

    def test_items(self, category: str) -> list[TestItem]:
        raise NotImplementedError

    def has_pixel_labels(self, category: str) -> bool:
        """False when ``category``'s test split has image labels only (its defective images have no masks at
        all): evaluation then reports image metrics only."""
        return True

    def describe(self) -> dict[str, str]:
        """What to record in checkpoints and reports to open this source again."""
        return {"root": str(self.root), "kind": self.kind, "dataset": self.dataset or ""}

    def _unknown_category(self, category: str, detail: str) -> FileNotFoundError:
        found = self.categories()
        known = DATASETS[self.kind].categories if self.kind in DATASETS else ()
        hint = ""
        if known and category not in known:
            hint = f"; {DATASETS[self.kind].title} has no category {category!r} (its categories: {', '.join(known)})"
        return FileNotFoundError(
            f"category {category!r} not found in {self.root} ({detail}); categories found: {found or 'none'}{hint}"
        )


@dataclass
class MVTecLayout(DataSource):
    """ROOT/<category>/{train/good, test/<type>, ground_truth/<type>/<stem><mask_suffix>.png}."""

    mask_suffix: str = "_mask"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "mask_suffix": self.mask_suffix}

    def categories(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "train" / GOOD).is_dir())

    def category_dir(self, category: str) -> Path:
        folder = self.root / category
        if not (folder / "train" / GOOD).is_dir():
            raise self._unknown_category(category, f"no folder {folder / 'train' / GOOD}")
        return folder

    def train_images(self, category: str) -> list[Path]:
        folder = self.category_dir(category) / "train" / GOOD
        files = image_files(folder)
        if not files:
            raise _no_images_error(folder, "training images")
        return files

    def _masks_by_name(self, gt_dir: Path) -> dict[str, list[Path]]:
        """The mask files of ``gt_dir`` by file name without extension, listed once per folder."""
        masks: dict[str, list[Path]] = {}
        for p in image_files(gt_dir) if gt_dir.is_dir() else []:
            masks.setdefault(p.stem, []).append(p)
        return masks

    def find_mask(self, gt_dir: Path, stem: str, masks: dict[str, list[Path]] | None = None) -> Path | None:
        """``gt_dir/<stem><mask_suffix>.<ext>`` for any image extension; an error if several exist. ``masks`` is
        ``gt_dir``'s listing when the caller already has it."""
        found = (masks if masks is not None else self._masks_by_name(gt_dir)).get(stem + self.mask_suffix, [])
        if len(found) > 1:
            raise ValueError(f"several masks for {stem} in {gt_dir}: {sorted(p.name for p in found)}; keep one")
        return found[0] if found else None

    def has_pixel_labels(self, category: str) -> bool:
        """True when the category has a ground_truth folder: then every defective test image needs its mask."""
        return (self.category_dir(category) / "ground_truth").is_dir()

    def test_items(self, category: str) -> list[TestItem]:
        """Every test image, sorted by defect type then name. Without any ground_truth folder the split has image
        labels only (every mask None). With one, a defective image without its mask is an error (its pixel labels
        are unknown), reported with the path the mask was expected at."""
        folder = self.category_dir(category)
        pixel_labels = self.has_pixel_labels(category)
        test_dir = folder / "test"
        if not test_dir.is_dir():
            raise FileNotFoundError(f"no test folder {test_dir} (expected test/good and test/<defect_type>)")
        items: list[TestItem] = []
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            gt_dir = folder / "ground_truth" / type_dir.name
            masks = self._masks_by_name(gt_dir) if type_dir.name != GOOD else {}
            for image_path in image_files(type_dir):
                if type_dir.name == GOOD or not pixel_labels:
                    items.append(TestItem(image_path, None, type_dir.name))
                    continue
                mask = self.find_mask(gt_dir, image_path.stem, masks)
                # A missing mask is reported when the item is loaded (at the path it was expected at), so that
                # --skip-bad can leave the image out and count it like any other bad file.
                expected = mask if mask is not None else gt_dir / f"{image_path.stem}{self.mask_suffix}.png"
                items.append(TestItem(image_path, expected, type_dir.name))
        if not items:
            raise _no_images_error(test_dir, "test images (in any test/<type> folder)")
        return items


@dataclass
class FolderLayout(MVTecLayout):
    """One category of your own whose folder is ROOT: ROOT/train/good, ROOT/test/<type>, ROOT/ground_truth/<type>.
    The category's name is the folder's name."""

    def categories(self) -> list[str]:
        return [self.root.name] if (self.root / "train" / GOOD).is_dir() else []

    def category_dir(self, category: str) -> Path:
        if category != self.root.name:
            raise self._unknown_category(category, "a folder dataset has one category, named after its folder")
        if not (self.root / "train" / GOOD).is_dir():
            raise FileNotFoundError(f"no folder {self.root / 'train' / GOOD}: a folder dataset needs train/good")
        return self.root


@dataclass
class VisALayout(DataSource):
    """VisA read through ``split_csv/<split_file>`` (default ``1cls.csv``, the standard one-class split)."""

    split_file: str = "1cls.csv"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "split_file": self.split_file}

    @property
    def csv_path(self) -> Path:
        return self.root / "split_csv" / self.split_file

    def _rows(self) -> list[dict[str, str]]:
        if not self.csv_path.is_file():
            raise FileNotFoundError(
                f"VisA split file {self.csv_path} not found; VisA's archive has it (split_csv/1cls.csv), "
                "or get it from the VisA repository (amazon-science/spot-diff)"
            )
        with self.csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{self.csv_path} lacks the column(s) {sorted(missing)}; is it VisA's split file?")
            return list(reader)

    def categories(self) -> list[str]:
        return sorted({row["object"] for row in self._rows()})

    def _category_rows(self, category: str, split: str) -> list[dict[str, str]]:
        rows = [r for r in self._rows() if r["object"] == category]
        if not rows:
            raise self._unknown_category(category, f"no rows for it in {self.csv_path}")
        return [r for r in rows if r["split"] == split]

    def _path(self, relative: str) -> Path:
        # A listed file that does not exist is reported when it is loaded, as for the other layouts.
        return self.root / relative.strip()

    def train_images(self, category: str) -> list[Path]:
        rows = [r for r in self._category_rows(category, "train") if r["label"] == "normal"]
        if not rows:
            raise FileNotFoundError(f"no normal training images of {category!r} in {self.csv_path}")
        return sorted(self._path(r["image"]) for r in rows)

    def test_items(self, category: str) -> list[TestItem]:
        items = []
        for row in self._category_rows(category, "test"):
            if row["label"] == "normal":
                items.append(TestItem(self._path(row["image"]), None, GOOD))
            else:
                mask = row["mask"].strip()
                items.append(TestItem(self._path(row["image"]), self.root / mask if mask else None, VISA_ANOMALY))
        if not items:
            raise FileNotFoundError(f"no test images of {category!r} in {self.csv_path}")
        return sorted(items, key=lambda it: (it.defect_type, str(it.image)))


ELPV_PACKAGE = "elpv-dataset"
ELPV_DEFECTIVE = "defective"
ELPV_MODULE_CELLS = 60
"""Lines of labels.csv per block: ELPV's modules have 60 cells, listed one module after the other. [ours]"""


def elpv_root() -> Path:
    """The data folder of the installed ``elpv-dataset`` package (labels.csv, images/); a clear error when it is
    not installed."""
    try:
        import elpv_dataset  # type: ignore[import-not-found]
    except ImportError as err:
        raise FileNotFoundError(
            f"the ELPV images come from the optional package {ELPV_PACKAGE}, which is not installed: "
            f"pip install {ELPV_PACKAGE} (or pip install -e '.[elpv]'), then use --data elpv"
        ) from err
    return Path(elpv_dataset.__file__).parent / "data"


@dataclass
class ELPVLayout(DataSource):
    """The ELPV solar cells, one category per cell type, image labels only (see the module's docstring)."""

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.csv"

    def _cells(self) -> list[tuple[str, float, str]]:
        """(relative path, defect probability, cell type) of every line of labels.csv."""
        if not self.labels_path.is_file():
            raise FileNotFoundError(f"ELPV label file {self.labels_path} not found; pip install {ELPV_PACKAGE}")
        cells = []
        for number, line in enumerate(self.labels_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                cells.append((parts[0], float(parts[1]), parts[2]))
            except (IndexError, ValueError) as err:
                raise ValueError(f"{self.labels_path}, line {number}: expected 'path probability type', got "
                                 f"{line!r}") from err
        return cells

    def categories(self) -> list[str]:
        return sorted({kind for _, _, kind in self._cells()})

    def _split(self, category: str) -> tuple[list[Path], list[Path], list[Path]]:
        """(training cells, good test cells, defective test cells) of one cell type, each sorted: the test cells
        from the odd blocks of :data:`ELPV_MODULE_CELLS` lines, the training cells from the even ones."""
        train: list[Path] = []
        good: list[Path] = []
        defective: list[Path] = []
        cells = [(line, path, p) for line, (path, p, kind) in enumerate(self._cells()) if kind == category]
        if not cells:
            raise self._unknown_category(category, f"no cells of that type in {self.labels_path}")
        for line, path, p in cells:
            test = (line // ELPV_MODULE_CELLS) % 2 == 1
            if p == 0.0:
                (good if test else train).append(self.root / path)
            elif p == 1.0 and test:
                defective.append(self.root / path)
        if not train or not good or not defective:
            raise ValueError(f"{self.labels_path}: the {category} cells give {len(train)} training, {len(good)} good "
                             f"and {len(defective)} defective test images; each split needs at least one")
        return sorted(train), sorted(good), sorted(defective)

    def train_images(self, category: str) -> list[Path]:
        return self._split(category)[0]

    def test_items(self, category: str) -> list[TestItem]:
        _, good, defective = self._split(category)
        return [TestItem(p, None, ELPV_DEFECTIVE) for p in defective] + [TestItem(p, None, GOOD) for p in good]

    def has_pixel_labels(self, category: str) -> bool:
        return False


def detect_kind(root: Path) -> str:
    """Guess the layout of ``root``: ``visa`` (split_csv/1cls.csv), ``elpv`` (labels.csv and images/), ``folder`` (train/good directly under it),
    a known dataset name when every category belongs to it, else ``mvtec`` (the MVTec AD layout)."""
    return _detect(root)[0]


def _detect(root: Path) -> tuple[str, str | None]:
    """(kind, the known dataset or None): a root whose categories are not all one dataset's is data of one's
    own in the MVTec AD layout."""
    if (root / "split_csv").is_dir():
        return "visa", "visa"
    if (root / "labels.csv").is_file() and (root / "images").is_dir():
        return "elpv", "elpv"
    if (root / "train" / GOOD).is_dir():
        return "folder", None
    categories = {p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir()}
    for name in ("mvtec", "mpdd", "builtin"):
        if categories and categories <= set(DATASETS[name].categories):
            return name, name
    return "mvtec", None


def open_source(
    root: str | Path,
    kind: str = "auto",
    *,
    mask_suffix: str = "_mask",
    split_file: str = "1cls.csv",
) -> DataSource:
    """Open the dataset at ``root``; ``kind`` is one of :data:`DATASET_KINDS` (``auto`` detects it).

    ``mask_suffix`` applies to the MVTec and folder layouts (``<stem><mask_suffix>.png``; "" for masks named
    like their image); ``split_file`` to VisA.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(
            f"dataset root not found: {base}. Give the folder holding the categories (or, for --dataset folder, "
            "the folder holding train/ and test/); `dmdd download --help` says how to get the public datasets"
        )
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    kind = DATASET_ALIASES.get(kind, kind)
    kind, dataset = _detect(base) if kind == "auto" else (kind, kind if kind in DATASETS else None)
    if kind == "visa":
        return VisALayout(base, kind, dataset, split_file=split_file)
    if kind == "elpv":
        return ELPVLayout(base, kind, dataset)
    if kind == "folder":
        return FolderLayout(base, kind, dataset, mask_suffix=mask_suffix)
    return MVTecLayout(base, kind, dataset, mask_suffix=mask_suffix)


def as_source(data: str | Path | DataSource, kind: str = "auto") -> DataSource:
    """``data`` itself when it is a :class:`DataSource`, else :func:`open_source` of it."""
    return data if isinstance(data, DataSource) else open_source(data, kind)


def source_from_description(description: dict[str, str]) -> DataSource:
    """Reopen a source from :meth:`DataSource.describe` (as saved in a checkpoint)."""
    source = open_source(
        description["root"],
        description.get("kind", "auto"),
        mask_suffix=description.get("mask_suffix", "_mask"),
        split_file=description.get("split_file", "1cls.csv"),
    )
    if "dataset" in description:
        source.dataset = description["dataset"] or None
    return source


def list_categories(root: str | Path, kind: str = "auto") -> list[str]:
    """Sorted category names of the dataset at ``root``."""
    return open_source(root, kind).categories()


def list_train_images(root: str | Path, category: str, kind: str = "auto") -> list[Path]:
    """Sorted normal training images of ``category`` (before the validation split is taken out)."""
    return open_source(root, kind).train_images(category)


def list_test_images(root: str | Path, category: str, kind: str = "auto") -> list[TestItem]:
    """(image, mask or None for good, defect_type) of every test image, sorted by defect type then name."""
    return open_source(root, kind).test_items(category)
