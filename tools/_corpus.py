"""Inline multilingual training text for the tiny XLM-R SentencePiece vocabulary (used by make_fixtures.py).

Plain word lists; make_fixtures.py turns them into pseudo-sentences with a seeded random.Random, so the
corpus (and therefore the SentencePiece model) is identical on every run.
"""

EN = """
the a an of and to in is was for on that with as by at from it this be are or have has had not but
what which who when where why how all any each many some more most other such no only own same so than
too very can will just should now one two three four five first last new old good great small large long
little big high low early late young right left next few public able bad best better certain clear
quick brown fox jumps over lazy dog cat bird fish horse tree forest river mountain city village house
street road bridge school university student teacher book paper page word sentence language model
search retrieval embedding vector dense sparse lexical token tokens passage query document documents
system systems measure measured measuring compare compared comparing recall precision latency length
lengths across research researchers result results method methods data train training trained test
testing evaluation score scores rank ranking match matching multi multilingual english german chinese
russian berlin beijing moscow london paris world hello love pizza pasta coffee tea water bread cheese
apple orange banana music film game play player team time year years day days week month morning night
people person man woman child children family friend friends work worker company market price money
number numbers call phone email address name names help question questions answer answers support
learn learning read reading write writing speak speaking understand understanding think thinking
information knowledge science computer network internet software hardware memory speed fast slow
embedding embeddings encoder decoder attention layer layers hidden state states weight weights
""".split()

DE = """
der die das und ist nicht ein eine einer einem einen zu den von mit sich des auf für im dem auch es an
als noch nach wie bei aus wird werden war sind hat haben oder aber vor zur zum bis mehr durch man sein
kann können muss müssen soll sollen größe größer größten bäume baum überrascht überraschung jürgen schön
schöne schöner straße straßen mädchen junge öffentlich öffentliche übersetzung übersetzen bahnhof
zentrum stadt städte liegt neben großen großer park wasser brot käse apfel müde grüße gemütlich
fröhlich ähnlich natürlich wörter wörterbuch sprache sprachen suche suchen ergebnis ergebnisse
frage fragen antwort antworten welt hallo liebe arbeit schule universität lehrer lehrerin buch bücher
""".split()

RU = """
и в не на я что он с как а то это все она так его но да ты к у же вы за бы по только ее мне было вот от
меня еще нет о из ему теперь когда даже ну вдруг ли если уже или ни быть был него до вас нибудь опять
москва москвы столица столицы россия россии город города большой большая большое привет мир мира язык
языка языки модель модели поиск поиска данные данных вопрос вопросы ответ ответы книга книги слово
слова работа работы школа университет учитель время день ночь утро вечер люди человек друг друзья
""".split()

# Chinese: one string of characters; sentences are random runs of 4-14 characters.
ZH = (
    "北京是中国的首都人口很多我们喜欢学习语言模型检索系统数据今天天气很好明天会下雨他她它们你好世界"
    "大学老师学生书本文字词句问题答案工作公司市场价格时间年月日星期早上晚上朋友家庭孩子人民国家城市"
    "山河水火木金土电脑网络软件硬件速度快慢信息知识科学研究结果方法训练测试评估分数排名匹配多种"
    "英文德文中文俄文上海广州深圳香港台湾东西南北左右前后高低长短新旧好坏美丽漂亮聪明"
)

PUNCT_DIGIT_LINES = [
    "Call 555-0199 now!!! (ok?) 3.14% of 100 items, 42 times; 2024-05-17.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 99 100 1000 1998 2000 2023 2024 2025.",
    "Punctuation: . , ; : ! ? ( ) [ ] { } \" ' - _ / \\ @ # $ % & * + = < > | ~ ^ `",
    "E-mail: user@example.com, web: www.example.org/path?q=1&x=2.",
    "Prices: $5.99, €12,50, £3, ¥100 — about 20% off!",
]


def _cap(rng, w):
    return w[0].upper() + w[1:] if rng.random() < 0.15 else w


def corpus_lines(rng):
    """Deterministic list of training lines, given a random.Random."""
    lines = list(PUNCT_DIGIT_LINES) * 3
    for _ in range(400):
        n = rng.randint(5, 14)
        s = " ".join(_cap(rng, rng.choice(EN)) for _ in range(n))
        lines.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ""]))
    for _ in range(250):
        n = rng.randint(4, 10)
        s = " ".join(_cap(rng, rng.choice(DE)) for _ in range(n))
        lines.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ":"]))
    for _ in range(250):
        n = rng.randint(4, 10)
        s = " ".join(rng.choice(RU) for _ in range(n))
        lines.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ", —"]))
    for _ in range(300):
        a = rng.randrange(len(ZH))
        n = rng.randint(4, 14)
        seg = "".join(ZH[(a + k * rng.choice([1, 1, 1, 2, 7])) % len(ZH)] for k in range(n))
        lines.append(seg + rng.choice(["。", "，", "？", "！", ""]))
    for _ in range(150):
        # mixed-language lines with digits
        parts = [rng.choice(EN), rng.choice(DE), rng.choice(RU), ZH[rng.randrange(len(ZH))] * rng.randint(1, 2),
                 str(rng.randint(0, 9999))]
        rng.shuffle(parts)
        lines.append(" ".join(parts))
    return lines
