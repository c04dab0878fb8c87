"""The public chest X-ray databases `covidcxr data download` knows: where each is fetched from, the adapter layout
that reads it, its licence and how to cite it, and how to get it by hand where it needs credentials.

Kept apart from the fetching so that what is known about a database is read, and corrected, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

_COVIDNET = (
    "research use, no licence file (COVID-Net / Figure 1 COVID-19 Chest X-ray Dataset Initiative); cite "
    "L. Wang, Z. Q. Lin, A. Wong, COVID-Net, Scientific Reports 10:19549 (2020)"
)
_NLM_TB = (
    "public NLM data set; cite S. Jaeger et al., Two public chest X-ray datasets for computer-aided "
    "screening of pulmonary diseases, Quant Imaging Med Surg 4(6):475-477 (2014)"
)
_NLM_TB_BY_HAND = (
    "the openi.nlm.nih.gov link is the one the literature gives and was not checked from here; if it fails, "
    "get the set from https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/ and copy "
    "CXR_png/ and ClinicalReadings/ into {dest}"
)


@dataclass(frozen=True)
class Database:
    """One downloadable database and what is known about getting it."""

    name: str
    layout: str  # the sources adapter that reads DIR/<name>
    citation: str  # licence and how to cite
    urls: tuple[str, ...] = ()  # mirrors, tried in order; empty when it cannot be fetched without credentials
    archive: str = "zip"  # zip | tar | tar.gz
    sha256: str | None = None  # None: a moving archive; its digest is recorded after download
    needs_credentials: bool = False
    instructions: str = ""  # how to get it by hand; {dest} is replaced by DIR/<name>
    url_confirmed: bool = True  # False: URL taken from the literature, not checked from here


def _kaggle(arguments: str) -> str:
    """How to fetch a Kaggle-hosted database with the user's own token."""
    return (
        "install the kaggle client (pip install kaggle), put your API token in ~/.kaggle/kaggle.json, "
        f"run `kaggle {arguments} -p {{dest}}`"
    )


def _github(repo: str) -> tuple[str, ...]:
    """The archive of a GitHub repository's master branch: the databases published as repositories."""
    return (f"https://github.com/{repo}/archive/refs/heads/master.zip",)


DATABASES: dict[str, Database] = {
    db.name: db
    for db in (
        Database(
            "cohen",
            "cohen",
            "per image (license column of metadata.csv: CC BY, CC BY-NC-SA, Apache 2.0, ...); cite "
            "J. P. Cohen et al., COVID-19 Image Data Collection: Prospective Predictions Are the Future, "
            "MELBA 2020",
            _github("ieee8023/covid-chestxray-dataset"),
        ),
        Database("figure1", "figure1", _COVIDNET, _github("agchung/Figure1-COVID-chestxray-dataset")),
        Database("actualmed", "actualmed", _COVIDNET, _github("agchung/Actualmed-COVID-chestxray-dataset")),
        Database(
            "montgomery",
            "montgomery_shenzhen",
            _NLM_TB,
            ("https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip",),
            instructions=_NLM_TB_BY_HAND,
            url_confirmed=False,
        ),
        Database(
            "shenzhen",
            "montgomery_shenzhen",
            _NLM_TB,
            ("https://openi.nlm.nih.gov/imgs/collections/ChinaSet_AllFiles.zip",),
            instructions=_NLM_TB_BY_HAND,
            url_confirmed=False,
        ),
        Database(
            "radiography",
            "radiography",
            "COVID-19 Radiography Database (Qatar University, Kaggle); cite M. E. H. Chowdhury et al., IEEE "
            "Access 8:132665 (2020) and T. Rahman et al., Comput Biol Med 132:104319 (2021)",
            needs_credentials=True,
            instructions=_kaggle("datasets download -d tawsifurrahman/covid19-radiography-database --unzip")
            + ", then ingest the folder that holds COVID/ Normal/ ...",
        ),
        Database(
            "rsna",
            "rsna",
            "RSNA Pneumonia Detection Challenge terms; cite G. Shih et al., Radiology: Artificial "
            "Intelligence 1(1):e180041 (2019)",
            needs_credentials=True,
            instructions=_kaggle("competitions download -c rsna-pneumonia-detection-challenge")
            + " after accepting the competition rules on kaggle.com, then unzip it there",
        ),
        Database(
            "kermany",
            "kermany",
            "CC BY 4.0; cite D. S. Kermany et al., Cell 172(5):1122-1131 (2018), "
            "data doi:10.17632/rscbjbr9sj.2",
            needs_credentials=True,
            instructions=_kaggle("datasets download -d paultimothymooney/chest-xray-pneumonia --unzip"),
        ),
        Database(
            "nih",
            "nih",
            "NIH ChestX-ray14, no restrictions on use, acknowledge the NIH Clinical Center; cite "
            "X. Wang et al., ChestX-ray8, CVPR 2017",
            needs_credentials=True,
            instructions=_kaggle("datasets download -d nih-chest-xrays/data --unzip")
            + " (or fetch it by hand from https://nihcc.app.box.com/v/ChestXray-NIHCC)",
        ),
    )
}


def default_sources() -> list[str]:
    """What `covidcxr data download` fetches when no --sources are given: public, no credentials,
    confirmed URL."""
    return [db.name for db in DATABASES.values() if db.urls and not db.needs_credentials and db.url_confirmed]
