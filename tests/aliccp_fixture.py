"""A small Ali-CCP raw dataset in exactly the raw format, for the tests and for demos.

Standard library only, so ``jobs/make_aliccp_fixture.py`` (the user-facing command) can import
it without Spark, and so it writes the format from its description (docs/ALICCP.md) rather
than from the parser's own constants: a test of the parser against its own constants could
not catch a wrong constant.

:func:`write_fixture` writes the four files; :data:`KNOWN_SAMPLE` is its first train line,
pinned so the tests can check parsing end to end value by value. The labels carry a known
signal (:func:`click_probability`, :func:`buy_probability`), so a trained model's AUC can be
compared with what the fixture allows.
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = [
    "COMMON",
    "KNOWN_SAMPLE",
    "SKELETON",
    "buy_probability",
    "click_probability",
    "write_fixture",
]

# File names: <log>_<split>.csv (as published); separators of a feature list.
SKELETON = "sample_skeleton"
COMMON = "common_features"
FEATURE_SEP = "\x01"
FIELD_SEP = "\x02"
VALUE_SEP = "\x03"

# The first train line of the fixture, pinned so tests can check parsing end to end.
# Its bag 109_14 has 20 entries (more than max_len) with distinct values, 210 has 3.
KNOWN_SAMPLE = {
    "sample_id": "1",
    "common_feature_index": "a0000000000001",
    "item": {"205": "205001", "206": "206001", "207": "207001", "216": "216001", "301": "1"},
    "intentions": [("210001", 1.0), ("210002", 3.0), ("210003", 2.0)],
    "user": {"101": "101001", "121": "121001", "124": "2", "125": "3"},
    "categories": [(str(109000 + k), float(k)) for k in range(1, 21)],
}

_USER_SINGLE = ("121", "122", "124", "125", "126", "127", "128", "129")
_USER_BAGS = ("109_14", "110_14", "127_14", "150_14")


def click_probability(item: int, slot: int) -> float:
    """P(click) of a generated line: mostly set by its ``slot`` (field 301, three values, so a
    model learns it from a few hundred lines), a little higher for every third item (field
    205 = 205000 + item; field 207 = 207000 + item % 90 carries the same signal)."""
    return (0.03, 0.15, 0.6)[slot - 1] + (0.1 if item % 3 == 0 else 0.0)


def buy_probability(user: int) -> float:
    """P(buy | click) of a generated line: higher for even users (field 101 = 101000 + user)."""
    return 0.4 if user % 2 == 0 else 0.12


def _entry(field: str, feature_id: str, value: float = 1.0) -> str:
    return f"{field}{FIELD_SEP}{feature_id}{VALUE_SEP}{value:g}"


def _join(entries: list[str]) -> str:
    return FEATURE_SEP.join(entries)


def _user_line(rng: random.Random, index: str, user: int) -> str:
    entries = [_entry("101", str(101000 + user))]
    entries += [_entry(f, str(rng.randrange(1, 9))) for f in _USER_SINGLE]
    for bag in _USER_BAGS:
        for _ in range(rng.randrange(0, 21)):
            entries.append(_entry(bag, str(rng.randrange(1, 500)), rng.randrange(1, 50) / 10))
    return f"{index},{len(entries)},{_join(entries)}"


def _sample_line(rng: random.Random, sample_id: int, index: str, user: int) -> str:
    item = rng.randrange(1, 300)
    slot = rng.randrange(1, 4)
    entries = [
        _entry("205", str(205000 + item)),
        _entry("206", str(206000 + item % 40)),
        _entry("207", str(207000 + item % 90)),
        _entry("216", str(216000 + item % 70)),
        _entry("301", str(slot)),
        _entry("508", str(rng.randrange(1, 1000)), rng.randrange(1, 9) / 2),
        _entry("509", str(rng.randrange(1, 1000)), rng.randrange(1, 9) / 2),
        _entry("702", str(rng.randrange(1, 1000)), rng.randrange(1, 9) / 2),
    ]
    for _ in range(rng.randrange(1, 4)):
        node = rng.randrange(1, 200)
        entries.append(_entry("210", str(210000 + node)))
        entries.append(_entry("853", str(853000 + node), rng.randrange(1, 9) / 2))
    # Labels with a known signal (slot, item and user groups), so AUCs are measurable.
    click = int(rng.random() < click_probability(item, slot))
    buy = int(click == 1 and rng.random() < buy_probability(user))
    return f"{sample_id},{click},{buy},{index},{len(entries)},{_join(entries)}"


def _known_lines() -> tuple[str, str]:
    k = KNOWN_SAMPLE
    item = [_entry(f, v) for f, v in k["item"].items()]
    item += [_entry("210", i, v) for i, v in k["intentions"]]
    skeleton = f"{k['sample_id']},1,1,{k['common_feature_index']},{len(item)},{_join(item)}"
    user = [_entry(f, v) for f, v in k["user"].items()]
    user += [_entry("109_14", i, v) for i, v in k["categories"]]
    common = f"{k['common_feature_index']},{len(user)},{_join(user)}"
    return skeleton, common


def write_fixture(
    folder: str | Path, seed: int = 7, train_samples: int = 3000, test_samples: int = 1500
) -> dict[str, dict[str, int]]:
    """Write a small Ali-CCP raw dataset (the four files) in exactly the raw format.

    Per split: ``samples`` skeleton lines over 120 users' common features, one user index
    used by ~30 % of the lines (a hot key, as in the real data), multi-valued bags longer than
    their ``max_len``, and the dirt each quarantine reason needs: a line with 5 columns, a
    non-integer click, a buy without click, an unknown common-feature index, a bad feature
    entry, a wrong feature_num; in the common file a malformed line and a duplicate index.
    The first train line is :data:`KNOWN_SAMPLE`. Deterministic for a given ``seed``.

    Returns:
        ``{split: {"skeleton_lines": n, "common_lines": m}}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split, samples in (("train", train_samples), ("test", test_samples)):
        rng = random.Random(f"{seed}-{split}")
        indexes = [f"{split[:2]}{rng.getrandbits(48):012x}" for _ in range(120)]
        common = [_user_line(rng, index, user) for user, index in enumerate(indexes)]
        common.append(common[5])  # a duplicate index (identical copy)
        common.append(f"{indexes[0]}-broken,7")  # two columns
        skeleton = []
        if split == "train":
            known_skeleton, known_common = _known_lines()
            skeleton.append(known_skeleton)
            common.insert(0, known_common)
        base = 1 if split == "train" else 10_000_001
        for n in range(len(skeleton), samples):
            user = 0 if rng.random() < 0.3 else rng.randrange(len(indexes))
            skeleton.append(_sample_line(rng, base + n, indexes[user], user))
        good = _sample_line(rng, 0, indexes[1], 1).split(",", 1)[1]  # a valid tail to damage
        click, buy, index, num, features = good.split(",")
        dirt = [
            f"{base + samples},{click},{buy},{index},{num}",  # 5 columns
            f"{base + samples + 1},yes,0,{index},{num},{features}",  # non-integer click
            f"{base + samples + 2},0,1,{index},{num},{features}",  # buy without click
            f"{base + samples + 3},{click},{buy},ffffffffffffff,{num},{features}",  # unknown key
            f"{base + samples + 4},{click},{buy},{index},{int(num) + 1},"
            f"{features}{FEATURE_SEP}205{FIELD_SEP}oops",  # bad entry
            f"{base + samples + 5},{click},{buy},{index},{int(num) + 3},{features}",  # bad count
        ]
        # Spread the dirt through the file instead of leaving it at the end.
        for offset, line in enumerate(dirt):
            skeleton.insert(rng.randrange(1, len(skeleton)) + offset, line)
        (folder / f"{SKELETON}_{split}.csv").write_text("\n".join(skeleton) + "\n")
        (folder / f"{COMMON}_{split}.csv").write_text("\n".join(common) + "\n")
        counts[split] = {"skeleton_lines": len(skeleton), "common_lines": len(common)}
    return counts
