"""The datasets the package knows, in one place: their categories, layouts, rotation policies and downloads.

Rotation policy (METHOD.md section 1): before synthesis, a normal training image is rotated by its category's
policy, "none", "small" (+-5 deg) or "right_angle_small" (a random multiple of 90 deg, then +-5 deg).
MVTec AD's policies are DeSTSeg's [DeSTSeg]; MPDD, VisA, the built-in textures and data of one's own are
choices of ours [ours]. A policy belongs to a dataset, not to a category name: the data source knows which dataset
it holds (:meth:`dmdd_core.data.DataSource.rotation_policy`). A source detected as MVTec AD, or named so with
``--dataset mvtec``, rotates like MVTec AD; data of one's own (a single folder, or a root whose categories are not
all one dataset's) is not rotated, so a folder named ``grid`` is not rotated like MVTec AD's grid. The policy a run
trained with is in its checkpoint. Validation and test images are never rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Layout = Literal["mvtec", "visa", "folder", "elpv"]
Policy = Literal["none", "small", "right_angle_small"]

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MPDD_CATEGORIES: tuple[str, ...] = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip
VISA_CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
    "pipe_fryum",
)  # fmt: skip
BUILTIN_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")
ELPV_CATEGORIES: tuple[str, ...] = ("mono", "poly")


@dataclass(frozen=True)
class DatasetInfo:
    """What the package knows about one dataset."""

    name: str
    """The name used by ``--dataset`` and ``dmdd download``."""
    title: str
    layout: Layout
    """How its files are arranged (:mod:`dmdd_core.data.sources`)."""
    categories: tuple[str, ...]
    rotation: dict[str, Policy] = field(default_factory=dict)
    """Category -> rotation policy; categories not listed get "none"."""
    reference: str = ""

    @property
    def download(self) -> DownloadSource | None:
        """Where ``dmdd download`` gets it (None for the built-in dataset)."""
        return DOWNLOADS.get(self.name)

    def rotation_policy(self, category: str) -> Policy:
        """The rotation policy of this dataset's ``category``; "none" for a category it does not list."""
        return self.rotation.get(category, "none")


DATASETS: dict[str, DatasetInfo] = {
    "mvtec": DatasetInfo(
        "mvtec",
        "MVTec AD",
        "mvtec",
        MVTEC_CATEGORIES,
        {
            **dict.fromkeys(("capsule", "metal_nut", "pill", "toothbrush", "transistor"), "none"),
            **dict.fromkeys(("wood", "zipper", "cable"), "small"),
            **dict.fromkeys(("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw"), "right_angle_small"),
        },  # [DeSTSeg]
        "Bergmann et al., CVPR 2019 and IJCV 2021",
    ),
    "mpdd": DatasetInfo(
        "mpdd",
        "MPDD (Metal Parts Defect Detection)",
        "mvtec",
        MPDD_CATEGORIES,
        {},  # [ours] parts are photographed in varying poses already
        "Jezek et al., ICUMT 2021",
    ),
    "visa": DatasetInfo(
        "visa",
        "VisA (Visual Anomaly)",
        "visa",
        VISA_CATEGORIES,
        {},  # [ours]
        "Zou et al., ECCV 2022",
    ),
    "builtin": DatasetInfo(
        "builtin",
        "built-in textures (generated offline)",
        "mvtec",
        BUILTIN_CATEGORIES,
        dict.fromkeys(BUILTIN_CATEGORIES, "right_angle_small"),  # [ours] textures without orientation
        "dmdd_core.data.builtin",
    ),
    "elpv": DatasetInfo(
        "elpv",
        "ELPV solar cells (PyPI elpv-dataset; image labels only)",
        "elpv",
        ELPV_CATEGORIES,
        {},  # [ours] cells are aligned, their busbars run one way
        "Buerhop-Lutz et al., EU PVSEC 2018; Deitsch et al., Solar Energy 2019 and Mach. Vis. Appl. 2021 "
        "(CC BY-NC-SA 4.0)",
    ),
}
"""Known datasets by name. A folder of one's own is read with the ``folder`` layout (no entry needed)."""

DATASET_ALIASES: dict[str, str] = {"mvtec_ad": "mvtec", "mvtec-ad": "mvtec"}
"""Other names accepted for a known dataset."""
DATASET_KINDS: tuple[str, ...] = ("auto", "mvtec", "mpdd", "visa", "builtin", "elpv", "folder", *DATASET_ALIASES)
"""Values of ``--dataset``: a known dataset (or an alias), ``folder`` for one category of your own, or ``auto``
(detect)."""


# --- downloads -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadSource:
    """Where one dataset comes from and what it looks like once extracted."""

    name: str
    """The name given to :func:`download_dataset` and ``dmdd download``."""
    title: str
    url: str | None
    """Direct address of the archive; None when there is no stable one (see :attr:`manual`)."""
    sha256: str | None
    """SHA-256 of the archive (64 lower-case hex digits); None when no published or verified one is known."""
    archive: str
    """File name of the archive ("" when unknown)."""
    size: int | None
    """Size of the archive in bytes, if known."""
    licence: str
    """Licence and what to cite."""
    folder: str
    """Name of the dataset folder under the download root after extraction."""
    layout: str
    """Expected layout after extraction, one pattern a line, relative to the dataset folder."""
    manual: str
    """How to get the archive by hand (no stable address, offline machine, a link that moved)."""
    usage: str = "Pass --data {path} to dmdd."
    """What to do with the extracted folder; ``{path}`` is replaced by it, ``{parent}`` by the folder above it."""
    archive_has_folder: bool = False
    """True when the archive's entries sit inside one folder named :attr:`folder` (DTD's ``dtd/``); False when
    they sit at its top level (MVTec AD, VisA), so it is extracted *into* the folder."""
    alternative_urls: tuple[str, ...] = ()
    """Older or other addresses of the same archive, tried in turn when the server answers with an HTTP error."""


DOWNLOADS: dict[str, DownloadSource] = {
    "mvtec": DownloadSource(
        name="mvtec",
        title="MVTec AD",
        # MVTec moves its mydrive.ch share links from time to time. The 150996/... link is the one in use in 2026
        # (several projects pinning the same SHA-256 use it); the 38536/...f283 link is the one stored in anomalib's
        # src/anomalib/data/datamodules/image/mvtecad.py, reported as answering 404 in anomalib issue #3608.
        url=(
            "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
            "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz"
        ),
        # anomalib DownloadInfo(hashsum=...) for MVTec AD; its hashsum is a SHA-256.
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        archive="mvtec_anomaly_detection.tar.xz",
        size=5_264_982_680,
        licence=(
            "CC BY-NC-SA 4.0 (non-commercial use). Cite Bergmann et al., 'MVTec AD - A Comprehensive Real-World "
            "Dataset for Unsupervised Anomaly Detection', CVPR 2019, and Bergmann et al., 'The MVTec Anomaly "
            "Detection Dataset', IJCV 129(4), 2021."
        ),
        folder="mvtec_anomaly_detection",
        layout=(
            "<category>/train/good/*.png                    (15 categories: bottle, cable, ... zipper)\n"
            "<category>/test/<type>/*.png                   (<type> is good or a defect type)\n"
            "<category>/ground_truth/<type>/<stem>_mask.png"
        ),
        manual=(
            "MVTec changes its download links from time to time. If this one fails, open "
            "https://www.mvtec.com/company/research/datasets/mvtec-ad/downloads, accept the licence and download "
            "the whole dataset (mvtec_anomaly_detection.tar.xz), or pass the new link as the URL to download."
        ),
        alternative_urls=(
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/"
            "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
        ),
    ),
    "visa": DownloadSource(
        name="visa",
        title="VisA (Visual Anomaly)",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        # anomalib src/anomalib/data/datamodules/image/visa.py DownloadInfo(hashsum=...), a SHA-256.
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        archive="VisA_20220922.tar",
        size=1_929_840_640,
        licence=(
            "CC BY 4.0 according to the dataset's README (amazon-science/spot-diff) and the LICENSE-DATASET file "
            "in the archive (anomalib's docstring says CC BY-NC-SA 4.0; the licence file in the archive is the "
            "one to follow). Cite Zou et al., 'SPot-the-Difference Self-Supervised Pre-training for Anomaly "
            "Detection and Segmentation', ECCV 2022."
        ),
        folder="visa",
        layout=(
            "<category>/Data/Images/Normal/*.JPG            (12 categories: candle, capsules, ... pipe_fryum)\n"
            "<category>/Data/Images/Anomaly/*.JPG\n"
            "<category>/Data/Masks/Anomaly/*.png\n"
            "split_csv/1cls.csv"
        ),
        manual="The archive is linked from the dataset's page, https://github.com/amazon-science/spot-diff.",
    ),
    "dtd": DownloadSource(
        name="dtd",
        title="DTD (Describable Textures Dataset)",
        url="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        # anomalib src/anomalib/models/image/draem/lightning_model.py DTD_DOWNLOAD_INFO (also torchvision's
        # prototype DTD dataset, sha256=...).
        sha256="e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
        archive="dtd-r1.0.1.tar.gz",
        size=625_239_812,
        licence=(
            "For research purposes (Oxford VGG). Cite Cimpoi et al., 'Describing Textures in the Wild', CVPR 2014."
        ),
        folder="dtd",
        layout="images/<class>/*.jpg                            (47 texture classes)\nlabels/\nimdb/",
        manual="The archive is linked from the dataset's page, https://www.robots.ox.ac.uk/~vgg/data/dtd/.",
        usage="Use {path}/images as the folder of texture images for anomaly synthesis (the texture_dir setting).",
        archive_has_folder=True,
    ),
    "mpdd": DownloadSource(
        name="mpdd",
        title="MPDD (Metal Parts Defect Detection)",
        url=None,  # the archive is on Google Drive: no stable direct address
        sha256=None,  # no published checksum
        archive="",
        size=None,
        licence=(
            "See the terms in the dataset's repository, https://github.com/stepanje/MPDD. Cite Jezek et al., "
            "'Deep learning-based defect detection of metal parts: evaluating current methods in complex "
            "conditions', ICUMT 2021."
        ),
        folder="mpdd",
        layout=(
            "<category>/train/good/*.png                    (6 categories: bracket_black, bracket_brown, "
            "bracket_white, connector, metal_plate, tubes)\n"
            "<category>/test/<type>/*.png                   (<type> is good or a defect type)\n"
            "<category>/ground_truth/<type>/<stem>_mask.png"
        ),
        manual=(
            "MPDD has no stable direct download address: its archive is on Google Drive, linked from the README "
            "of https://github.com/stepanje/MPDD. Download it in a browser (or with a Google Drive client such "
            "as gdown), then unzip it and arrange the category folders as shown below; or, with a direct link of "
            "your own, download it with `dmdd download mpdd --url LINK`."
        ),
    ),
}
"""Every archive ``dmdd download`` knows, by name: the datasets of :data:`DATASETS` that have one, and DTD (the
textures of the synthesis). [addresses and checksums: anomalib's dataset modules and the datasets' pages]"""


# --- MVTec AD, one category at a time ---------------------------------------------------------------------------
MVTEC_CATEGORY_ARCHIVES: dict[str, str] = {
    "bottle": "420937370-1629951468", "cable": "420937413-1629951498", "capsule": "420937454-1629951595",
    "carpet": "420937484-1629951672", "grid": "420937487-1629951814", "hazelnut": "420937545-1629951845",
    "leather": "420937607-1629951964", "metal_nut": "420937637-1629952063", "pill": "420938129-1629953099",
    "screw": "420938130-1629953152", "tile": "420938133-1629953189", "toothbrush": "420938134-1629953256",
    "transistor": "420938166-1629953277", "wood": "420938383-1629953354", "zipper": "420938385-1629953449",
}  # fmt: skip
"""MVTec AD is published per category as well as whole: each category's archive ``<category>.tar.xz`` (its folder
``<category>/`` inside) has this identifier in the address. [the addresses of MVTec's download share, as listed
by several public projects]"""
MVTEC_CATEGORY_MIRRORS: tuple[str, ...] = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/{archive}/{category}.tar.xz",
)
"""Address templates of the per-category archives, tried in order (``{archive}``: the identifier above)."""
MVTEC_CATEGORY_SHA256: dict[str, str] = {}
"""SHA-256 of each per-category archive, where one is known. MVTec publishes none and none has been verified here:
until one is added, a category's archive is not checked against a known digest; its own SHA-256 is printed and
recorded in the category's marker file, so two downloads can be compared."""


def mvtec_category_source(category: str, mirrors: tuple[str, ...] = MVTEC_CATEGORY_MIRRORS) -> DownloadSource:
    """The download of one MVTec AD category: extracted to ``mvtec_anomaly_detection/<category>``, beside the
    other categories, so the folder reads like the whole dataset with fewer categories."""
    if category not in MVTEC_CATEGORY_ARCHIVES:
        raise ValueError(f"unknown MVTec AD category {category!r}; choose among {', '.join(MVTEC_CATEGORIES)}")
    whole = DOWNLOADS["mvtec"]
    urls = [m.format(archive=MVTEC_CATEGORY_ARCHIVES[category], category=category) for m in mirrors]
    return DownloadSource(
        name=f"mvtec:{category}",
        title=f"MVTec AD, category {category}",
        url=urls[0],
        sha256=MVTEC_CATEGORY_SHA256.get(category),
        archive=f"{category}.tar.xz",
        size=None,
        licence=whole.licence,
        folder=f"{whole.folder}/{category}",
        layout="train/good/*.png\ntest/<type>/*.png\nground_truth/<type>/<stem>_mask.png",
        manual=("MVTec changes its download links from time to time. If this one fails, open "
                "https://www.mvtec.com/company/research/datasets/mvtec-ad/downloads, accept the licence and download "
                f"the category's archive ({category}.tar.xz)."),
        usage="Pass --data {parent} to dmdd: the folder of the categories, read as MVTec AD (its rotation policies).",
        archive_has_folder=True,
        alternative_urls=tuple(urls[1:]),
    )
