#!/usr/bin/env python3
"""Build data/demo/ (the quickstart's retrieval set) from the Apache HTTP Server manual.

Source (real text written by others, permissive licence):
    Debian package apache2-doc 2.4.71-1~deb12u1 (bookworm-security), file tree
    /usr/share/doc/apache2-doc/manual/<lang>/..., the Apache HTTP Server 2.4 documentation,
    Copyright The Apache Software Foundation, licensed under the Apache License 2.0
    (/usr/share/doc/apache2-doc/copyright: "Files: * ... License: Apache-2.0").

Get it and run (stdlib only; deterministic: same input -> byte-identical output):
    apt-get download apache2-doc=2.4.71-1~deb12u1
    dpkg-deb -x apache2-doc_2.4.71-1~deb12u1_all.deb /tmp/apache2-doc
    python3 tools/make_demo_data.py /tmp/apache2-doc/usr/share/doc/apache2-doc/manual data/demo

What it makes (BEIR layout + training files):
* Every configuration directive of every module page (mod/*.html) has a one-line
  "Description:" written by the manual's authors (e.g. Redirect: "Sends an external redirect
  asking the client to fetch a different URL") and a body of prose explaining it.
  Query = the description line; its single relevant passage (score 1) = the body (the summary
  table, which holds the description, is removed from the passage). The directive name is the
  passage title. Nothing is written by hand.
* Languages: English, plus the translations shipped in the package (fr, de, es, ja, ko, tr, zh-cn, ...)
  where a directive section is really translated (its description and body differ from the
  English ones; ja/ko also need CJK/Hangul in the description) - untranslated sections that the
  translated pages carry over in English are skipped.
* Queries whose text is not unique (e.g. two directives with the same description) are dropped.
* Split by directive (module + directive name, hashed), so all language versions of a directive
  fall in the same split: ~70% train, 10% dev, 20% test. Test and dev queries and their passages
  never appear in train.jsonl. The corpus holds every passage (all splits), as in BEIR.
* train.jsonl (FlagEmbedding): {"query", "pos": [its passage], "neg": [3 random passages of
  other train directives in the same language]}, seeded.
* pretrain.txt: one paragraph per line from the manual's guide pages (everything outside mod/),
  i.e. text that holds no query or passage of the retrieval set.
"""

import hashlib
import html
import json
import os
import random
import re
import sys
from html.parser import HTMLParser

LANGS = ["en", "fr", "de", "es", "ja", "ko", "pt-br", "da", "ru", "tr", "zh-cn"]
MAX_PASSAGE_CHARS = 500
MAX_PRETRAIN_LINES = 2000
N_NEG = 3
SEED = 20240601


class TextOf(HTMLParser):
    """Visible text of an HTML fragment; block elements become line breaks."""

    BLOCK = {"p", "div", "pre", "li", "h1", "h2", "h3", "h4", "tr", "table", "dd", "dt", "br"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        self.out.append(data)


def text_of(fragment):
    p = TextOf()
    p.feed(fragment)
    p.close()
    lines = [" ".join(l.split()) for l in "".join(p.out).split("\n")]
    return "\n".join(l for l in lines if l)


def flat(s):
    return " ".join(s.split())


def cut(s, n):
    """At most n characters, cut at a word boundary."""
    if len(s) <= n:
        return s
    s = s[:n]
    return s[: s.rfind(" ")] if " " in s else s


SECTION = re.compile(r'<div class="directive-section"><h2 id="([^"]+)">(?:<span id="([^"]+)">)?')
# The row label is translated ("Beschreibung:", "説明:"); its link target is not.
DESC = re.compile(r'directive-dict\.html#Description">[^<]*</a></th><td>(.*?)</td></tr>', re.S)


def read_html(path):
    """A page decoded with the charset its meta tag declares (a few are ISO-8859-1 / EUC-KR)."""
    raw = open(path, "rb").read()
    m = re.search(rb"charset=([A-Za-z0-9_-]+)", raw[:1000])
    enc = m.group(1).decode() if m else "utf-8"
    return raw.decode(enc, errors="replace")


def directives(path):
    """(directive id, name, description, body) of every directive section of a module page."""
    s = read_html(path)
    starts = [(m.start(), m.group(1), m.group(2) or m.group(1)) for m in SECTION.finditer(s)]
    end_all = s.find('<div class="bottomlang">')
    for i, (at, did, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else (end_all if end_all > 0 else len(s))
        sec = s[at:end]
        m = DESC.search(sec)
        t = sec.find("</table>")
        if not m or t < 0:
            continue
        desc = flat(html.unescape(re.sub(r"<[^>]+>", "", m.group(1))))
        body = flat(text_of(sec[t + len("</table>"):]))
        body = body.replace("Permanent link", "").strip()
        if len(desc) < 8 or len(body) < 80:
            continue
        yield did, name, desc, body


def has_script(s, lang):
    if lang in ("ja", "zh-cn"):
        return any("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in s)
    if lang == "ko":
        return any("\uac00" <= c <= "\ud7a3" for c in s)
    if lang == "ru":
        return any("\u0400" <= c <= "\u04ff" for c in s)
    return True


def split_of(key):
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 70 else ("dev" if h < 80 else "test")


def guide_paragraphs(root, lang):
    """Paragraphs of the non-module pages of one language (real translations only)."""
    out = []
    base = os.path.join(root, lang)
    for dirpath, dirs, files in os.walk(base):
        dirs.sort()
        rel = os.path.relpath(dirpath, base)
        if rel.split(os.sep)[0] in ("mod", "developer"):
            continue
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            if not f.endswith(".html") or os.path.islink(p):
                continue
            s = read_html(p)
            if f'<html lang="{lang}"' not in s[:400]:
                continue
            for m in re.finditer(r"<p>(.*?)</p>", s, re.S):
                t = flat(text_of(m.group(1)))
                if len(t) >= 60 and has_script(t, lang):
                    out.append(t)
    return out


def main(root, out):
    rows = {}  # (lang, module, directive) -> (desc, body)
    for lang in LANGS:
        mod_dir = os.path.join(root, lang, "mod")
        if not os.path.isdir(mod_dir):
            continue
        for f in sorted(os.listdir(mod_dir)):
            p = os.path.join(mod_dir, f)
            if not f.endswith(".html") or os.path.islink(p) or f in ("directives.html", "quickreference.html"):
                continue
            module = f[: -len(".html")]
            for did, name, desc, body in directives(p):
                rows[(lang, module, did)] = (name, desc, body)
    kept = []
    for (lang, module, did), (name, desc, body) in sorted(rows.items()):
        if lang != "en":
            en = rows.get(("en", module, did))
            if en is None or en[1] == desc or en[2][:200] == body[:200] or not has_script(desc, lang):
                continue
        kept.append((lang, module, did, name, desc, body))
    count = {}
    for r in kept:
        count[r[4]] = count.get(r[4], 0) + 1
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    corpus, queries, qrels = [], [], {"train": [], "dev": [], "test": []}
    by_split_lang = {}
    for lang, module, did, name, desc, body in kept:
        doc_id = f"{lang}.{module}.{did}"
        passage = cut(body, MAX_PASSAGE_CHARS)
        corpus.append({"_id": doc_id, "title": name, "text": passage})
        if count[desc] != 1:
            continue
        split = split_of(f"{module}.{did}")
        qid = f"q.{doc_id}"
        queries.append({"_id": qid, "text": desc})
        qrels[split].append((qid, doc_id))
        by_split_lang.setdefault((split, lang), []).append((desc, passage, doc_id))
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as w:
        for d in corpus:
            w.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "queries.jsonl"), "w", encoding="utf-8") as w:
        for q in queries:
            w.write(json.dumps(q, ensure_ascii=False) + "\n")
    for split, pairs in qrels.items():
        with open(os.path.join(out, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as w:
            w.write("query-id\tcorpus-id\tscore\n")
            for q, d in pairs:
                w.write(f"{q}\t{d}\t1\n")
    rng = random.Random(SEED)
    with open(os.path.join(out, "train.jsonl"), "w", encoding="utf-8") as w:
        for lang in LANGS:
            group = by_split_lang.get(("train", lang), [])
            for i, (desc, passage, _) in enumerate(group):
                others = [g[1] for j, g in enumerate(group) if j != i]
                if len(others) < N_NEG:
                    continue
                negs = rng.sample(others, N_NEG)
                w.write(json.dumps({"query": desc, "pos": [passage], "neg": negs}, ensure_ascii=False) + "\n")
    lines = []
    for lang in LANGS:
        lines.extend(guide_paragraphs(root, lang))
    rng.shuffle(lines)
    with open(os.path.join(out, "pretrain.txt"), "w", encoding="utf-8") as w:
        for t in lines[:MAX_PRETRAIN_LINES]:
            w.write(cut(t, MAX_PASSAGE_CHARS) + "\n")
    langs = {}
    for d in corpus:
        l = d["_id"].split(".")[0]
        langs[l] = langs.get(l, 0) + 1
    stats = {
        "corpus": len(corpus),
        "queries": len(queries),
        "qrels": {k: len(v) for k, v in qrels.items()},
        "corpus_by_language": langs,
        "pretrain_lines": min(len(lines), MAX_PRETRAIN_LINES),
    }
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_demo_data.py MANUAL_DIR OUT_DIR")
    main(sys.argv[1], sys.argv[2])
