"""Four tiny visual games for RL fine-tuning of a vision-language model (after RL4VLM, Zhai et al.
2024), each state shown only as a small RGB image; `demo` writes a noisy demonstrator's answer.
- NumberLine: step the current number toward the target.
- Blackjack: Blackjack-v1 (infinite deck, dealer stands on soft 17, no natural bonus), solved by DP.
- EZPoints / Points24, the paper's rules: a formula worth 12 / 24 from the cards, a token a step;
  a number with no unused card: -1, a slot left blank; "=", or a step on over 5 / 20 entries,
  ends: +10 if it fits, uses each card once and is worth the target, else -1. Success: return > 0.
Differences from the paper's code:
- exact values, not eval(): "2" "4" is not 24, x / 0 is ill formed, 8 / (3 - 8 / 3) is 24;
- an over-long formula is a loss, terminated (the paper: truncated, which vlm_rl.py bootstraps);
- EZPoints deals a second card worth 10 as any of 10, J, Q, K (the paper: always a 10);
- our pictures: 112 px, drawn cards, a 14-px cell per entry (the paper: 300 px card images, text);
- vlm_rl.py scores each answer under the picture it was sampled with (the paper: the first);
- our demonstrator (the paper's env code has none): on an unsolvable Points24 deal it writes the
  cards in order, "+" between, then "=" (-1, like "=" at once, which taught RL to give up).
"""
import functools
import itertools
import random
from fractions import Fraction

from PIL import Image, ImageDraw, ImageFont

@functools.cache
def font(size):  # Pillow's bundled font, on first use: no font files, no work at import
    return ImageFont.load_default(size=size)

class _Env:
    """A game for vlm_rl.py; README.md's "Add your own game" has the details. It defines `name`,
    `action_names`, `image_size`, `task`, `cot_fields`, `default_noise`, `max_steps` (if bounded),
    `_deal()`, `step(action)`, `info(success)`, `render()`, `correct_action()`, `cot_values()`.
    State in plain attributes: numbers, strings, lists (checkpoints save it as JSON).
    truncated only at a time limit (vlm_rl.py bootstraps it), never for a loss."""
    default_noise = 0.5
    def __init__(self):
        self.rng = random.Random()
        self.done = True  # stepping before the first reset() is an error

    def reset(self, seed=None):
        if seed is not None:
            self.rng = random.Random(seed)
        self.done = False
        self._deal()
        return self.render(), self.info(False)

    def _check(self, action):
        if self.done:
            raise RuntimeError("the episode is over: call reset() first")
        if action not in range(len(self.action_names)):
            raise ValueError(f"action must index {self.action_names}, got {action!r}")
        return int(action)

    def demo(self, noise, rng, cot=True):
        """A one-line JSON answer for the current state: thoughts (if cot), then the action."""
        if not 0 <= noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        action = self.correct_action()
        if rng.random() < noise:  # a deliberate mistake: any legal action but the correct one
            action = rng.choice([a for a in range(len(self.action_names)) if a != action])
        fields = (self.cot_values() if cot else []) + [("action", self.action_names[action])]
        return "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields) + "}"  # json's spacing varies

class NumberLine(_Env):
    name = "numberline"
    action_names = ["-", "+"]
    image_size = 56
    max_steps = 10
    default_noise = 0.7  # random play succeeds 60% of the time: SFT must teach worse than that
    task = ("You are playing a game called number line. You see a target number and a current "
            "number in the image. Move the current number to the target by adding or subtracting "
            "one.")
    cot_fields = '"current number": "x", "target number": "x", "thoughts": "compare them"'
    def _deal(self):
        self.target = self.rng.randint(0, 5)
        self.current = self.rng.randint(0, 5)
        self.steps = 0
        while self.current == self.target:  # an episode that starts solved teaches nothing
            self.current = self.rng.randint(0, 5)

    def step(self, action):
        action = self._check(action)  # first: a bad action changes nothing
        before = abs(self.current - self.target)
        self.steps += 1
        self.current = min(5, max(0, self.current + (1 if action == 1 else -1)))  # edges block
        after = abs(self.current - self.target)
        terminated = after == 0
        truncated = after != 0 and self.steps >= self.max_steps
        reward = 1.0 if terminated else 0.0 if after < before else -1.0  # closer: 0, else -1
        self.done = terminated or truncated
        return self.render(), reward, terminated, truncated, self.info(terminated)

    def info(self, success):
        return {"success": success, "target": self.target, "current": self.current,
                "steps": self.steps}

    def correct_action(self):
        return 1 if self.current < self.target else 0

    def cot_values(self):
        sign = "<" if self.current < self.target else ">"
        return [("current number", self.current), ("target number", self.target),
                ("thoughts", f"{self.current} {sign} {self.target}")]

    def render(self):  # small labels over big digits: "Target: 4" is too wide for 56 px, legibly
        img = Image.new("RGB", (self.image_size,) * 2, "white")
        draw = ImageDraw.Draw(img)
        mid = self.image_size // 2
        for y, label, value in ((2, "Target", self.target), (30, "Current", self.current)):
            draw.text((mid, y), label, fill="black", font=font(12), anchor="mt")
            draw.text((mid, y + 12), str(value), fill="black", font=font(16), anchor="mt")
        return img

RANKS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
SUITS = ["spades", "hearts", "diamonds", "clubs"]
VALUE = {r: min(i + 1, 10) for i, r in enumerate(RANKS)}  # an ace is 1 here, +10 when usable
P_VALUE = {v: (4 if v == 10 else 1) / 13 for v in range(1, 11)}  # infinite deck: 10 J Q K all 10

def _add(total, soft, v):  # (total, soft) after a card of value v; soft: an ace counts 11
    total += v
    if soft and total > 21:
        return total - 10, False  # the usable ace falls back to 1 instead of busting
    if not soft and v == 1 and total + 10 <= 21:
        return total + 10, True
    return total, soft

def hand_value(cards):
    """(total, soft) of a list of (rank, suit) cards."""
    return functools.reduce(lambda hand, card: _add(*hand, VALUE[card[0]]), cards, (0, False))

@functools.cache
def _dealer_final(total, soft):  # {the dealer's final total (22: bust): probability}
    if total >= 17:  # includes soft 17: the dealer stands on it
        return {min(total, 22): 1.0}
    dist = {}
    for v, p in P_VALUE.items():
        for final, q in _dealer_final(*_add(total, soft, v)).items():
            dist[final] = dist.get(final, 0.0) + p * q
    return dist

@functools.cache
def _stand(total, up):  # (win, draw, loss) of standing on total against an up card worth up
    dist = _dealer_final(*_add(0, False, up))  # the hidden card is just another fresh draw
    win = sum(q for f, q in dist.items() if f == 22 or f < total)
    draw = dist.get(total, 0.0)
    return win, draw, 1.0 - win - draw

@functools.cache
def _best(total, soft, up):  # (expected return, action) of optimal play; hit only if better
    if total > 21:
        return -1.0, 0
    win, _, loss = _stand(total, up)
    hit = sum(p * _best(*_add(total, soft, v), up)[0] for v, p in P_VALUE.items())
    return (hit, 1) if hit > win - loss else (win - loss, 0)

@functools.cache
def blackjack_optimal():
    """{(player total: 4..21 hard, 12..21 soft, soft, dealer's up value): 0 stand or 1 hit}."""
    return {(t, s, up): _best(t, s, up)[1] for t in range(4, 22) for s in (False, True)
            if t >= 12 or not s for up in range(1, 11)}

CARD_W, CARD_H = 20, 28
STEM = ("p", (0, 0, -2, 4, 2, 4))
SUIT_SHAPES = {  # the font has no suit glyphs: ("e" ellipse or "p" polygon, flat x, y offsets)
    "diamonds": [("p", (0, -4, 3, 0, 0, 4, -3, 0))],
    "hearts": [("e", (-4, -3, 0, 1)), ("e", (0, -3, 4, 1)), ("p", (-4, 0, 4, 0, 0, 4))],
    "spades": [("p", (-4, 0, 4, 0, 0, -4)), ("e", (-4, -1, 0, 3)), ("e", (0, -1, 4, 3)), STEM],
    "clubs": [("e", (-2, -5, 2, -1)), ("e", (-5, -2, -1, 2)), ("e", (1, -2, 5, 2)), STEM],
}

def _draw_card(draw, x, y, card=None):  # a (rank, suit) card at top-left (x, y), None: the back
    box = (x, y, x + CARD_W - 1, y + CARD_H - 1)
    if card is None:  # the back: dark with an inner frame, so it never looks like a face
        draw.rectangle(box, fill="navy", outline="black")
        draw.rectangle((x + 3, y + 3, x + CARD_W - 4, y + CARD_H - 4), outline="lightblue")
        return
    rank, suit = card
    draw.rectangle(box, fill="white", outline="black")
    draw.text((x + CARD_W // 2, y + 2), rank, fill="black", font=font(13), anchor="mt")
    color = "red" if suit in ("hearts", "diamonds") else "black"
    centre = (x + CARD_W // 2, y + 20)
    for kind, coords in SUIT_SHAPES[suit]:
        xy = [c + centre[i % 2] for i, c in enumerate(coords)]
        (draw.ellipse if kind == "e" else draw.polygon)(xy, fill=color)

class Blackjack(_Env):
    name = "blackjack"
    action_names = ["stand", "hit"]
    image_size = 112
    default_noise = 0.4  # mostly right: a mostly wrong demonstrator teaches RL to always stand
    task = ("You are a blackjack player. You see the dealer's face-up card and your own cards. "
            "Choose to hit (take a card) or stand (stop). Get closer to 21 than the dealer without "
            "going over 21.")
    cot_fields = '"thoughts": "the dealer\'s card, my cards and my total"'
    def _draw(self):
        return self.rng.choice(RANKS), self.rng.choice(SUITS)

    def _deal(self):  # the state: two plain lists of (rank, suit); dealer[0] is the up card
        self.player = [self._draw(), self._draw()]
        self.dealer = [self._draw(), self._draw()]

    def step(self, action):
        action = self._check(action)
        if action == 1:
            self.player.append(self._draw())
            reward = -1.0 if hand_value(self.player)[0] > 21 else 0.0
        else:
            while hand_value(self.dealer)[0] < 17:  # a soft 17 counts as 17: the dealer stands
                self.dealer.append(self._draw())
            me, dealer = hand_value(self.player)[0], hand_value(self.dealer)[0]
            reward = 1.0 if dealer > 21 or me > dealer else 0.0 if me == dealer else -1.0
        terminated = action == 0 or reward < 0  # a stand or a bust ends the hand
        self.done = terminated
        return self.render(), reward, terminated, False, self.info(reward > 0)

    def info(self, success):
        total, soft = hand_value(self.player)
        return {"success": success, "player": [r for r, _ in self.player],
                "dealer_up": self.dealer[0][0], "player_total": total, "soft": soft}

    def correct_action(self):
        total, soft = hand_value(self.player)
        return 0 if total > 21 else blackjack_optimal()[(total, soft, VALUE[self.dealer[0][0]])]

    def cot_values(self):
        total, soft = hand_value(self.player)
        cards = " ".join(r for r, _ in self.player)
        return [("thoughts", f"dealer {self.dealer[0][0]}, me {cards} = {'soft ' * soft}{total}")]

    def render(self):  # the hole card stays face down even after the stand: what the player sees
        img = Image.new("RGB", (self.image_size,) * 2, (0, 110, 50))
        draw = ImageDraw.Draw(img)
        _draw_card(draw, 4, 4, self.dealer[0])
        _draw_card(draw, 26, 4, None)
        draw.text((52, 18), "Dealer", fill="white", font=font(12), anchor="lm")
        draw.text((4, 40), "Player", fill="white", font=font(12), anchor="lm")
        for i, card in enumerate(self.player):  # rows of five; an 11th card would fall off
            _draw_card(draw, 2 + 22 * (i % 5), 52 + 30 * (i // 5), card)
        return img

NUMBERS = [str(v) for v in range(1, 11)]  # the number tokens: a card's values
BLANK = " "  # the formula entry of a mistaken number (the paper's; "_" in the thoughts)
OPS = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__,
       "/": Fraction.__truediv__}

def evaluate(tokens):
    """Exact value (a Fraction) of a list of tokens; None if ill formed or dividing by 0. Splits
    at the last + or - outside brackets, else the last * or /: * binds tighter, ties go left."""
    depth = 0
    split = -1
    for k, token in enumerate(tokens):
        depth += (token == "(") - (token == ")")
        if depth == 0 and token in OPS and (split < 0 or token in "+-" or tokens[split] in "*/"):
            split = k
    if split >= 0:
        a, b = evaluate(tokens[:split]), evaluate(tokens[split + 1:])
        if a is None or b is None or (tokens[split] == "/" and b == 0):
            return None
        return OPS[tokens[split]](a, b)
    if len(tokens) == 1 and tokens[0] in NUMBERS:  # no operator outside brackets: a number,
        return Fraction(tokens[0])
    if len(tokens) > 2 and tokens[0] == "(" and tokens[-1] == ")":  # or a formula in brackets
        return evaluate(tokens[1:-1])
    return None

@functools.cache
def solutions(values, ops, target=None):
    """{value: {tokens: precedence}}: formulas using each value once (if set, only the target's)."""
    if len(values) == 1:
        return {Fraction(values[0]): {(str(values[0]),): 3}}
    out = {}
    for mask in range(1, 2 ** len(values) - 1):  # each split into a left and a right operand
        left = tuple(v for k, v in enumerate(values) if mask >> k & 1 == 1)
        right = tuple(v for k, v in enumerate(values) if mask >> k & 1 == 0)
        pairs = itertools.product(ops, solutions(left, ops).items(), solutions(right, ops).items())
        for op, (a, fa), (b, fb) in pairs:
            if (op == "/" and b == 0) or (target is not None and OPS[op](a, b) != target):
                continue
            prec = 1 if op in "+-" else 2  # a sum's precedence, a product's (a number's: 3)
            for (ta, pa), (tb, pb) in itertools.product(fa.items(), fb.items()):
                ta = ("(", *ta, ")") if pa < prec else ta  # (a + b) * c
                tb = ("(", *tb, ")") if pb < prec + (op in "-/") else tb  # a - (b + c), a / (b * c)
                out.setdefault(OPS[op](a, b), {})[ta + (op,) + tb] = prec
    return out

class _Formula(_Env):  # state: cards, (rank, suit) pairs, and formula, the entries (blanks too)
    image_size = 112
    default_noise = 0.7  # EZPoints: as NumberLine's, SFT starts low (the paper's SFT: 23%)
    cards_at = (4, 24, 2)  # the first card's x, the stride, y
    in_order = False  # plans and dead ends keep the cards' order
    cot_fields = '"cards": "their values", "formula": "the tokens so far", "thoughts": "next"'
    @property
    def values(self):
        return [VALUE[rank] for rank, _ in self.cards]

    @property
    def written(self):  # the formula's tokens, blanks dropped: what "=" evaluates, what uses cards
        return [t for t in self.formula if t != BLANK]

    def _deal(self):
        self.cards = self._cards()
        self.formula = []
        self.steps = 0
        self.total = 0.0

    def step(self, action):
        token = self.action_names[self._check(action)]
        n = len(self.formula)  # blanks included: they take slots
        written = self.written
        used = sorted(int(t) for t in written if t in NUMBERS)
        worth = evaluate(written) == self.target
        solved = n <= self.max_len and used == sorted(self.values) and worth
        no_card = token in NUMBERS and written.count(token) >= self.values.count(int(token))
        terminated = token == "=" or n > self.max_len  # any step on an over-long formula ends it
        if terminated:
            reward = 10.0 if solved else -1.0
        else:  # a mistaken number still takes a slot: max_len - len(solution) mistakes fit
            reward = -1.0 if no_card else 0.0
            self.formula += [BLANK if no_card else token]
        self.steps += 1
        self.total += reward
        self.done = terminated
        return self.render(), reward, terminated, False, self.info(self.total > 0)

    def info(self, success):
        return {"success": success, "cards": self.values, "formula": list(self.formula),
                "steps": self.steps}

    def correct_action(self):  # on along the shortest fitting solution the formula begins, or "="
        written = self.written
        n = len(written)
        free = self.max_len - len(self.formula) + n  # slots for tokens: max_len less the blanks
        found = solutions(tuple(sorted(self.values)), self.ops, self.target)
        def order(plan):
            in_card_order = [int(t) for t in plan if t in NUMBERS] == self.values
            return (self.in_order and not in_card_order, len(plan))
        plans = (s for s in found.get(self.target, ()) if list(s[:n]) == written and len(s) <= free)
        plan = min(plans, key=order, default=())
        if not plan and self.in_order:  # no solution: the unused cards in order, "+" between
            left = [v for k, v in enumerate(self.values)
                    if self.values[:k + 1].count(v) > written.count(str(v))]
            ends_operand = "".join(written[-1:]) in NUMBERS + [")"]
            plan = written + ["+" if ends_operand else str(v) for v in left[:1]]
        return self.action_names.index(plan[n] if len(plan) > n else "=")

    def cot_values(self):
        token = self.action_names[self.correct_action()]
        complete = len(self.formula) <= self.max_len and evaluate(self.written) == self.target
        thoughts = f"next {token}" if token != "=" else "complete" if complete else "stuck"
        shown = " ".join("_" if t == BLANK else t for t in self.formula)  # a blank, visibly
        return [("cards", " ".join(map(str, self.values))), ("formula", shown or "empty"),
                ("thoughts", thoughts)]

    def render(self):  # the formula: 8 a row, one entry a 14-px cell (a patch), blank: empty
        img = Image.new("RGB", (self.image_size,) * 2, (0, 110, 50))
        draw = ImageDraw.Draw(img)
        for i, card in enumerate(self.cards):
            _draw_card(draw, self.cards_at[0] + self.cards_at[1] * i, self.cards_at[2], card)
        draw.text((2, 31), "Formula:", fill="white", font=font(10))
        for k, token in enumerate(self.formula):
            x, y = 14 * (k % 8), 42 + 14 * (k // 8)
            draw.rectangle((x, y, x + 13, y + 13), fill="white")
            if token != BLANK:
                draw.text((x + 7, y + 7), token, fill="black", font=font(12), anchor="mm")
        return img

class EZPoints(_Formula):
    name = "ezpoints"
    target = 12
    ops = "+*"
    max_len = 5  # 3 tokens solve it: at most 2 mistakes
    max_steps = 7  # max_len + 1 entries, then any step ends it
    action_names = NUMBERS + list("+*=")
    task = ('Build a formula worth 12 from the 2 cards, each used once (J, Q, K are 10), token by '
            'token; "=" ends it.')
    def _cards(self):  # a second value making 12: 12 / v on a coin flip when whole, else 12 - v
        first = RANKS[self.rng.randint(1, 12)]  # ranks 2 .. K
        v = VALUE[first]
        w = 12 // v if v in (1, 2, 3, 4, 6) and self.rng.random() < 0.5 else 12 - v
        second = RANKS[w - 1] if w < 10 else self.rng.choice(RANKS[9:])  # a 10: 10, J, Q or K
        return [(rank, self.rng.choice(SUITS)) for rank in self.rng.sample([first, second], 2)]

class Points24(_Formula):
    name = "points24"
    target = 24
    ops = "+-*/"
    max_len = 20
    max_steps = 22
    action_names = NUMBERS + list("+-*/()=")
    task = ('Build a formula worth 24 from the 4 cards, each used once (J, Q, K are 10), token by '
            'token; "=" ends it.')
    default_noise = 0.3  # up to 12 steps to a solution: at 0.7 it would hardly ever show one
    cards_at = (11, 28, 0)  # ranks centred in 14-px patches (README.md: why)
    in_order = True  # learnable plans (README.md: why)
    def _cards(self):  # nothing guarantees a solution: about 73% of deals have one
        return [(self.rng.choice(RANKS), self.rng.choice(SUITS)) for _ in range(4)]
