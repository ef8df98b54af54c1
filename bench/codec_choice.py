"""Compare zlib and zstandard on real-looking reference-API JSON: ratio and encode/decode speed.

Run: python bench/codec_choice.py
"""
from __future__ import annotations

import argparse
import json
import random
import time
import zlib

import zstandard

WORDS = (
    "dog cat animal pet mammal wolf bark tail fur loyal house garden run play food bone "
    "friend companion breed puppy leash hunt sleep water bowl walk park street city tree"
).split()


def conceptnet_page(rng: random.Random, edges: int) -> bytes:
    """A ConceptNet /c/en/<term> answer: a list of edges with URIs, weights and surface text."""
    def node(term: str) -> dict:
        return {"@id": f"/c/en/{term}", "@type": "Node", "label": term, "language": "en", "term": f"/c/en/{term}"}

    items = []
    for _ in range(edges):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        rel = rng.choice(["RelatedTo", "IsA", "HasA", "UsedFor", "CapableOf", "AtLocation", "Synonym"])
        items.append({
            "@id": f"/a/[/r/{rel}/,/c/en/{a}/,/c/en/{b}/]",
            "@type": "Edge",
            "dataset": "/d/conceptnet/4/en",
            "end": node(b), "start": node(a),
            "license": "cc:by/4.0",
            "rel": {"@id": f"/r/{rel}", "@type": "Relation", "label": rel},
            "sources": [{"@id": "/and/[/s/process/split_words/,/s/resource/verbosity/]", "@type": "Source",
                         "contributor": "/s/resource/verbosity", "process": "/s/process/split_words"}],
            "surfaceText": f"[[{a}]] is related to [[{b}]]",
            "weight": round(rng.uniform(0.1, 12.0), 3),
        })
    return json.dumps({"@context": ["http://api.conceptnet.io/ld/conceptnet5.7/context.ld.json"],
                       "@id": "/c/en/dog", "edges": items}).encode()


def wikidata_entity(rng: random.Random, claims: int) -> bytes:
    """A Wikidata wbgetentities answer: labels in many languages and a pile of claims."""
    langs = ["en", "de", "fr", "es", "it", "nl", "pl", "pt", "ru", "ja", "zh", "sv", "fi", "cs"]
    claims_by_property: dict[str, list[dict]] = {}
    entity = {
        "type": "item", "id": "Q144",
        "labels": {lang: {"language": lang, "value": rng.choice(WORDS).title()} for lang in langs},
        "descriptions": {lang: {"language": lang, "value": " ".join(rng.choices(WORDS, k=6))} for lang in langs},
        "claims": claims_by_property,
    }
    for _ in range(claims):
        pid = f"P{rng.randint(1, 3000)}"
        claims_by_property.setdefault(pid, []).append({
            "mainsnak": {"snaktype": "value", "property": pid, "hash": "%040x" % rng.getrandbits(160),
                         "datavalue": {"value": {"entity-type": "item", "numeric-id": rng.randint(1, 10**7),
                                                 "id": f"Q{rng.randint(1, 10**7)}"}, "type": "wikibase-entityid"}},
            "type": "statement", "id": f"Q144${rng.getrandbits(64):016x}", "rank": "normal",
        })
    return json.dumps({"entities": {"Q144": entity}, "success": 1}).encode()


def measure(name: str, compress, decompress, samples: list[bytes], rounds: int = 20) -> tuple:
    blobs = [compress(s) for s in samples]
    start = time.perf_counter()
    for _ in range(rounds):
        for s in samples:
            compress(s)
    enc = (time.perf_counter() - start) / (rounds * len(samples))
    start = time.perf_counter()
    for _ in range(rounds):
        for b in blobs:
            decompress(b)
    dec = (time.perf_counter() - start) / (rounds * len(samples))
    ratio = sum(map(len, samples)) / sum(map(len, blobs))
    return name, ratio, enc * 1e6, dec * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two samples (bench/smoke.py): check that it runs")
    smoke = parser.parse_args().smoke
    rng = random.Random(7)
    samples = [conceptnet_page(rng, n) for n in ((5,) if smoke else (5, 20, 50, 200))]
    samples += [wikidata_entity(rng, n) for n in ((10,) if smoke else (10, 100, 600))]
    print(f"{len(samples)} samples, {sum(map(len, samples)) / 1024:.0f} KiB in all")
    zc = {level: zstandard.ZstdCompressor(level=level) for level in (1, 3, 6)}
    zd = zstandard.ZstdDecompressor()
    rows = [measure(f"zlib-{lvl}", lambda b, level=lvl: zlib.compress(b, level), zlib.decompress, samples)
            for lvl in (1, 6, 9)]
    rows += [measure(f"zstd-{lvl}", c.compress, zd.decompress, samples) for lvl, c in zc.items()]
    print(f"{'codec':8} {'ratio':>6} {'encode us':>10} {'decode us':>10}")
    for name, ratio, enc, dec in rows:
        print(f"{name:8} {ratio:6.2f} {enc:10.1f} {dec:10.1f}")


if __name__ == "__main__":
    main()
