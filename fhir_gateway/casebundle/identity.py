"""Identity rule (pure): does a pulled record or study belong to the referral's patient?

Demographics are read from a FHIR Patient (`patient_to_demographics`) or a DICOM header
(`dataset_to_demographics`) and compared field by field (`compare`). The verdict names the
fields that contradict or could not be confirmed, never their values. docs/identity.md states
the rule; tests/unit/test_identity.py tests it. No I/O, no clock, no logging.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.valuerep import PersonName
from rapidfuzz import fuzz

MATCH, PROBABLE, MISMATCH = "match", "probable", "mismatch"
IDENTIFIER, NAME, BIRTH_DATE, SEX = "identifier", "name", "birthDate", "sex"
REFERENCE = "reference"  # a record points at a patient the partner was not asked for
FIELDS = (IDENTIFIER, NAME, BIRTH_DATE, SEX)

# Names: rapidfuzz token_sort_ratio (0-100) of the normalised names, best pair of variants.
NAME_AGREE = 85.0  # at or above: the names agree
NAME_DIFFER = 60.0  # below: the names contradict; in between: neither (not confirmed)

AGREE, DIFFER = "agree", "differ"
_SEX_CODES = {"male": "male", "female": "female", "other": "other", "m": "male", "f": "female"}
_SEX_CODES["o"] = "other"
_NOT_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


@dataclass(frozen=True)
class Demographics:
    """What identifies a person, normalised. An identifier's system is None when unknown
    (a DICOM PatientID whose issuer neither the file nor the partners file names)."""

    identifiers: tuple[tuple[str | None, str], ...] = ()
    names: tuple[str, ...] = ()
    birth_date: str | None = None  # FHIR date: YYYY, YYYY-MM or YYYY-MM-DD
    sex: str | None = None  # male | female | other

    @property
    def empty(self) -> bool:
        return not (self.identifiers or self.names or self.birth_date or self.sex)


@dataclass(frozen=True)
class Verdict:
    """The outcome and the fields behind it, by name only (never a compared value)."""

    outcome: str  # match | probable | mismatch
    differ: tuple[str, ...] = ()  # fields that contradict
    unconfirmed: tuple[str, ...] = ()  # fields missing on a side, or not agreeing enough

    @property
    def held(self) -> bool:
        """Probable and mismatch are held for an admin (docs/identity.md, "held")."""
        return self.outcome != MATCH

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "differ": list(self.differ),
            "unconfirmed": list(self.unconfirmed),
        }


# --------------------------------------------------------------------------- reading


def normalise_name(text: str) -> str:
    """Case, accents and punctuation folded: `Alcántar-Ruíz, JOSÉ` -> `alcantar ruiz jose`."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_NOT_ALNUM.sub(" ", bare.casefold()).split())


def _name_variants(family: str, given: list[str]) -> list[str]:
    """The full name, and family + first given name (a middle name on one side only)."""
    full = normalise_name(" ".join([family, *given]))
    short = normalise_name(" ".join([family, *given[:1]]))
    return [v for v in dict.fromkeys([full, short]) if v]


def human_name_variants(name: dict[str, Any]) -> list[str]:
    """FHIR HumanName -> comparable strings (family + given; `text` when there are no parts)."""
    family = str(name.get("family") or "")
    given = [str(g) for g in name.get("given") or [] if g]
    if family or given:
        return _name_variants(family, given)
    text = normalise_name(str(name.get("text") or ""))
    return [text] if text else []


def person_name_variants(value: Any) -> list[str]:
    """DICOM PN `Family^Given^Middle^Prefix^Suffix`, each of its alphabetic, ideographic and
    phonetic groups (`=`), -> comparable strings. Prefix and suffix are left out."""
    pn = value if isinstance(value, PersonName) else PersonName(str(value or ""))
    out: list[str] = []
    for group in pn.components:
        parts = group.split("^")
        family = parts[0] if parts else ""
        given = [p for p in parts[1:3] if p]
        out += _name_variants(family, given)
    return list(dict.fromkeys(out))


def _fhir_date(value: str) -> str | None:
    """FHIR date or DICOM DA (`YYYYMMDD`) -> `YYYY[-MM[-DD]]`; None when unusable."""
    text = value.strip()
    if re.fullmatch(r"\d{8}", text):
        text = f"{text[:4]}-{text[4:6]}-{text[6:]}"
    text = text[:10]
    return text if re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", text) else None


def _sex(value: Any) -> str | None:
    return _SEX_CODES.get(str(value or "").strip().lower())


def patient_to_demographics(patient: dict[str, Any]) -> Demographics:
    """A FHIR R4 Patient's identifiers (with systems), names, birthDate and gender."""
    idents = tuple(
        (str(i["system"]) if i.get("system") else None, str(i["value"]).strip())
        for i in patient.get("identifier") or []
        if isinstance(i, dict) and str(i.get("value") or "").strip()
    )
    names: list[str] = []
    for name in patient.get("name") or []:
        if isinstance(name, dict):
            names += human_name_variants(name)
    birth = patient.get("birthDate")
    return Demographics(
        identifiers=tuple(dict.fromkeys(idents)),
        names=tuple(dict.fromkeys(names)),
        birth_date=_fhir_date(birth) if isinstance(birth, str) else None,
        sex=_sex(patient.get("gender")),
    )


def dataset_to_demographics(ds: Dataset, default_issuer: str | None = None) -> Demographics:
    """A DICOM header's Patient module: PatientID with IssuerOfPatientID (else the partners
    file's issuer for the PACS, else unknown), OtherPatientIDsSequence, PatientName,
    PatientBirthDate, PatientSex."""
    idents: list[tuple[str | None, str]] = []

    def add(item: Dataset) -> None:
        value = str(item.get("PatientID") or "").strip()
        if value:
            issuer = str(item.get("IssuerOfPatientID") or "").strip() or default_issuer
            idents.append((issuer, value))

    add(ds)
    for other in ds.get("OtherPatientIDsSequence") or []:
        add(other)
    birth = str(ds.get("PatientBirthDate") or "")
    return Demographics(
        identifiers=tuple(dict.fromkeys(idents)),
        names=tuple(person_name_variants(ds.get("PatientName") or "")),
        birth_date=_fhir_date(birth) if birth else None,
        sex=_sex(ds.get("PatientSex")),
    )


# --------------------------------------------------------------------------- comparing


def _system_key(system: str) -> str:
    """`urn:oid:1.2.3` and `1.2.3` name the same system (an issuer may be written either way)."""
    return system.removeprefix("urn:oid:")


def compare_identifiers(
    ours: Iterable[tuple[str | None, str]], theirs: Iterable[tuple[str | None, str]]
) -> str | None:
    """`differ` when a system both sides use shares no value; else `agree` when a value is
    shared in one system (or by value, where a side's system is unknown); else None."""
    mine: dict[str | None, set[str]] = {}
    for system, value in ours:
        mine.setdefault(_system_key(system) if system else None, set()).add(value)
    other: dict[str | None, set[str]] = {}
    for system, value in theirs:
        other.setdefault(_system_key(system) if system else None, set()).add(value)
    known = {s for s in mine if s is not None} & {s for s in other if s is not None}
    if any(not (mine[s] & other[s]) for s in known):
        return DIFFER
    if known:
        return AGREE
    unknown_mine = mine.get(None, set())
    unknown_other = other.get(None, set())
    all_mine = set().union(*mine.values()) if mine else set()
    all_other = set().union(*other.values()) if other else set()
    if (unknown_mine & all_other) or (unknown_other & all_mine):
        return AGREE
    return None


def name_score(ours: Iterable[str], theirs: Iterable[str]) -> float | None:
    """Best rapidfuzz token_sort_ratio over the name variants; None when a side has none."""
    a, b = list(ours), list(theirs)
    if not a or not b:
        return None
    return max(fuzz.token_sort_ratio(x, y) for x in a for y in b)


def compare_dates(ours: str | None, theirs: str | None) -> str | None:
    """Equal at the precision both have (`1967` agrees with `1967-01-21`)."""
    if not ours or not theirs:
        return None
    n = min(len(ours), len(theirs))
    return AGREE if ours[:n] == theirs[:n] else DIFFER


def compare(reference: Demographics, candidate: Demographics) -> Verdict:
    """The rule (docs/identity.md):

    - mismatch: any field contradicts: an identifier system both use with no common value,
      birth date or sex differ, or name similarity below NAME_DIFFER;
    - match: nothing contradicts and an identifier is shared;
    - probable: nothing contradicts, no identifier shared, but name, birth date and sex agree;
    - mismatch (unconfirmed): nothing contradicts but there is too little to tell.
    """
    score = name_score(reference.names, candidate.names)
    name = None
    if score is not None:
        name = AGREE if score >= NAME_AGREE else DIFFER if score < NAME_DIFFER else "weak"
    status = {
        IDENTIFIER: compare_identifiers(reference.identifiers, candidate.identifiers),
        NAME: name,
        BIRTH_DATE: compare_dates(reference.birth_date, candidate.birth_date),
        SEX: (
            None
            if not reference.sex or not candidate.sex
            else AGREE
            if reference.sex == candidate.sex
            else DIFFER
        ),
    }
    differ = tuple(f for f in FIELDS if status[f] == DIFFER)
    unconfirmed = tuple(f for f in FIELDS if status[f] not in (AGREE, DIFFER))
    if differ:
        return Verdict(MISMATCH, differ, unconfirmed)
    if status[IDENTIFIER] == AGREE:
        return Verdict(MATCH, (), unconfirmed)
    if all(status[f] == AGREE for f in (NAME, BIRTH_DATE, SEX)):
        return Verdict(PROBABLE, (), unconfirmed)
    return Verdict(MISMATCH, (), unconfirmed)


def foreign_reference() -> Verdict:
    """A record whose subject is a patient the partner was not asked for, and whose Patient
    did not come with the pull: nothing to compare, so it is held as a mismatch."""
    return Verdict(MISMATCH, (REFERENCE,), ())


__all__ = [
    "MATCH",
    "MISMATCH",
    "PROBABLE",
    "Demographics",
    "Verdict",
    "compare",
    "dataset_to_demographics",
    "foreign_reference",
    "normalise_name",
    "patient_to_demographics",
    "person_name_variants",
]
