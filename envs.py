"""Four tiny visual games for RL fine-tuning of a vision-language model (after RL4VLM, Zhai et al. 2024). The agent
sees each state only as a small RGB image; `demo` writes a noisy demonstrator's answer. NumberLine: step the current
number toward the target. Blackjack: Gymnasium Blackjack-v1 rules (infinite deck, dealer stands on soft 17, no natural
bonus), with its exact optimal policy by DP. EZPoints / Points24: a formula worth 12 / 24 from the cards. Unlike the
paper's code: an exact evaluator, not eval ("2" "4" is not 24; x / 0 is not well formed); a time limit of 14 / 24 steps
(the longest formula allowed and "=" take 7 / 22), not 300; vlm_rl.py scores each answer under the picture it was
sampled with (the paper's update re-scored all under the first picture); on a Points24 deal without a solution the
demonstrator writes the cards in order, "+" between, and "=" (-1, as "=" at once, which taught RL to give up)."""
import functools
import itertools
import random
from fractions import Fraction

from PIL import Image, ImageDraw, ImageFont

@functools.cache
def _font(size):
    return ImageFont.load_default(size=size)  # Pillow's bundled font: no font files needed

# --- Shared bookkeeping: seeding, action checks, the demonstrator
class _Env:
    default_noise = 0.5  # probability that a demonstration shows a wrong action (each game sets its own)

    def __init__(self):
        self.rng, self.done = random.Random(), True  # stepping before the first reset() is an error

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
        """One-line JSON answer for the current state: reasoning fields (if cot), then the action."""
        if not 0 <= noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        action = self.correct_action()
        if rng.random() < noise:  # a deliberate mistake: any legal action but the correct one
            action = rng.choice([a for a in range(len(self.action_names)) if a != action])
        fields = (self.cot_values() if cot else []) + [("action", self.action_names[action])]
        return "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields) + "}"  # fixed spacing, unlike json

# --- NumberLine
class NumberLine(_Env):
    name, action_names, image_size, max_steps = "numberline", ["-", "+"], 56, 10
    default_noise = 0.7  # random play already succeeds 60% of the time: SFT must teach worse than that
    task = ("You are playing a game called number line. You see a target number and a current number in "
            "the image. Move the current number to the target by adding or subtracting one.")
    cot_fields = '"current number": "x", "target number": "x", "thoughts": "compare them"'

    def _deal(self):
        self.target, self.current, self.steps = self.rng.randint(0, 5), self.rng.randint(0, 5), 0
        while self.current == self.target:  # an episode that starts solved teaches nothing
            self.current = self.rng.randint(0, 5)

    def step(self, action):
        action = self._check(action)  # first: a bad action changes nothing
        before, self.steps = abs(self.current - self.target), self.steps + 1
        self.current = min(5, max(0, self.current + (1 if action == 1 else -1)))  # edges block
        after = abs(self.current - self.target)
        terminated, truncated = after == 0, after != 0 and self.steps >= self.max_steps
        reward = 1.0 if terminated else 0.0 if after < before else -1.0
        self.done = terminated or truncated
        return self.render(), reward, terminated, truncated, self.info(terminated)

    def info(self, success):
        return {"success": success, "target": self.target, "current": self.current, "steps": self.steps}

    def correct_action(self):
        return 1 if self.current < self.target else 0

    def cot_values(self):
        sign = "<" if self.current < self.target else ">"
        return [("current number", self.current), ("target number", self.target),
                ("thoughts", f"{self.current} {sign} {self.target}")]

    def render(self):
        # Small labels over big digits: "Target: 4" on one line is too wide for 56 px at a legible size.
        draw, mid = ImageDraw.Draw(img := Image.new("RGB", (self.image_size,) * 2, "white")), self.image_size // 2
        for y, label, value in ((2, "Target", self.target), (30, "Current", self.current)):
            draw.text((mid, y), label, fill="black", font=_font(12), anchor="mt")
            draw.text((mid, y + 12), str(value), fill="black", font=_font(16), anchor="mt")
        return img

# --- Blackjack rules and the exact optimal policy
RANKS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
SUITS = ["spades", "hearts", "diamonds", "clubs"]
VALUE = {r: min(i + 1, 10) for i, r in enumerate(RANKS)}  # an ace is 1 here, +10 when usable
P_VALUE = {v: (4 if v == 10 else 1) / 13 for v in range(1, 11)}  # infinite deck: 10 J Q K all 10
NUMBERS = [str(v) for v in range(1, 11)]  # EZPoints' and Points24's number tokens: the values a card can have
OPS = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__, "/": Fraction.__truediv__}

def _add(total, soft, v):
    """(total, soft) after a card of value v (soft: an ace counts 11); the env and the DP share it."""
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
def _dealer_final(total, soft):
    """{final dealer total (22 = bust): probability} for a dealer holding (total, soft)."""
    if total >= 17:  # includes soft 17: the dealer stands on it
        return {min(total, 22): 1.0}
    dist = {}
    for v, p in P_VALUE.items():
        for final, q in _dealer_final(*_add(total, soft, v)).items():
            dist[final] = dist.get(final, 0.0) + p * q
    return dist

@functools.cache
def _stand(total, up):
    """(win, draw, loss) of standing on `total` against a dealer showing value `up`."""
    dist = _dealer_final(*_add(0, False, up))  # the hidden card is just another fresh draw
    win, draw = sum(q for f, q in dist.items() if f == 22 or f < total), dist.get(total, 0.0)
    return win, draw, 1.0 - win - draw

@functools.cache
def _best(total, soft, up):
    """(expected return, action) of optimal play from here; hit only when strictly better."""
    if total > 21:
        return -1.0, 0
    win, _, loss = _stand(total, up)
    hit = sum(p * _best(*_add(total, soft, v), up)[0] for v, p in P_VALUE.items())
    return (hit, 1) if hit > win - loss else (win - loss, 0)

@functools.cache
def blackjack_optimal():
    """{(player_total, soft, dealer_up_value 1..10): action (0 stand, 1 hit)} maximizing return.
    Hard totals run 4..21 (2+2 is the lowest hand), soft totals 12..21 (A+A is the lowest)."""
    return {(t, s, up): _best(t, s, up)[1] for t in range(4, 22) for s in (False, True)
            if t >= 12 or not s for up in range(1, 11)}

# --- Blackjack env and its pictures (the bundled font has no suit glyphs: suits are tiny shapes)
CARD_W, CARD_H = 20, 28
STEM = ("p", (0, 0, -2, 4, 2, 4))
SUIT_SHAPES = {  # (ellipse or polygon, flat x, y offsets from the suit's centre)
    "diamonds": [("p", (0, -4, 3, 0, 0, 4, -3, 0))],
    "hearts": [("e", (-4, -3, 0, 1)), ("e", (0, -3, 4, 1)), ("p", (-4, 0, 4, 0, 0, 4))],
    "spades": [("p", (-4, 0, 4, 0, 0, -4)), ("e", (-4, -1, 0, 3)), ("e", (0, -1, 4, 3)), STEM],
    "clubs": [("e", (-2, -5, 2, -1)), ("e", (-5, -2, -1, 2)), ("e", (1, -2, 5, 2)), STEM],
}

def _draw_card(draw, x, y, card=None):
    """A face-up (rank, suit) card with its top-left corner at (x, y), or the back if card is None."""
    box = (x, y, x + CARD_W - 1, y + CARD_H - 1)
    if card is None:  # dark with an inner frame, so the back never looks like a face
        draw.rectangle(box, fill="navy", outline="black")
        return draw.rectangle((x + 3, y + 3, x + CARD_W - 4, y + CARD_H - 4), outline="lightblue")
    rank, suit = card
    draw.rectangle(box, fill="white", outline="black")
    draw.text((x + CARD_W // 2, y + 2), rank, fill="black", font=_font(13), anchor="mt")
    color, centre = ("red" if suit in ("hearts", "diamonds") else "black"), (x + CARD_W // 2, y + 20)
    for kind, coords in SUIT_SHAPES[suit]:
        xy = [c + centre[i % 2] for i, c in enumerate(coords)]
        (draw.ellipse if kind == "e" else draw.polygon)(xy, fill=color)

class Blackjack(_Env):
    name, action_names, image_size = "blackjack", ["stand", "hit"], 112
    default_noise = 0.4  # mostly right: a demonstrator that is mostly wrong teaches RL to always stand
    task = ("You are a blackjack player. You see the dealer's face-up card and your own cards. Choose "
            "to hit (take a card) or stand (stop). Get closer to 21 than the dealer without going over 21.")
    cot_fields = '"thoughts": "the dealer\'s card, my cards and my total"'

    # State: two plain lists of (rank, suit) that tests can set; dealer[0] is the up card.
    def _draw(self):
        return self.rng.choice(RANKS), self.rng.choice(SUITS)

    def _deal(self):
        self.player, self.dealer = [self._draw(), self._draw()], [self._draw(), self._draw()]

    def step(self, action):
        action = self._check(action)
        if action == 1:
            self.player.append(self._draw())
            reward = -1.0 if hand_value(self.player)[0] > 21 else 0.0
        else:
            while hand_value(self.dealer)[0] < 17:  # a soft 17 counts as 17, so the dealer stands
                self.dealer.append(self._draw())
            me, dealer = hand_value(self.player)[0], hand_value(self.dealer)[0]
            reward = 1.0 if dealer > 21 or me > dealer else 0.0 if me == dealer else -1.0
        self.done = terminated = action == 0 or reward < 0  # a stand or a bust ends the hand
        return self.render(), reward, terminated, False, self.info(reward > 0)

    def info(self, success):
        total, soft = hand_value(self.player)
        return {"success": success, "player": [r for r, _ in self.player],
                "dealer_up": self.dealer[0][0], "player_total": total, "soft": soft}

    def correct_action(self):
        total, soft = hand_value(self.player)
        return 0 if total > 21 else blackjack_optimal()[(total, soft, VALUE[self.dealer[0][0]])]

    def cot_values(self):
        (total, soft), cards = hand_value(self.player), " ".join(r for r, _ in self.player)
        return [("thoughts", f"dealer {self.dealer[0][0]}, me {cards} = {'soft ' * soft}{total}")]

    def render(self):
        # The hole card stays face down even after the stand: the image shows what the player sees.
        draw = ImageDraw.Draw(img := Image.new("RGB", (self.image_size,) * 2, (0, 110, 50)))
        _draw_card(draw, 4, 4, self.dealer[0])
        _draw_card(draw, 26, 4, None)
        draw.text((52, 18), "Dealer", fill="white", font=_font(12), anchor="lm")
        draw.text((4, 40), "Player", fill="white", font=_font(12), anchor="lm")
        for i, card in enumerate(self.player):  # rows of five; an 11th card would fall off the image
            _draw_card(draw, 2 + 22 * (i % 5), 52 + 30 * (i // 5), card)
        return img

# --- EZPoints and Points24: a formula over the cards' values that equals the target
def evaluate(tokens):  # exact value (a Fraction) of a list of tokens; None if not well formed or dividing by 0
    depth, split = 0, -1
    for k, token in enumerate(tokens):  # split at the last + or - outside brackets, else the last * or /
        depth += (token == "(") - (token == ")")
        if depth == 0 and token in OPS and (split < 0 or token in "+-" or tokens[split] in "*/"):
            split = k
    if split >= 0:
        a, b = evaluate(tokens[:split]), evaluate(tokens[split + 1:])
        return None if a is None or b is None or (tokens[split] == "/" and b == 0) else OPS[tokens[split]](a, b)
    if len(tokens) == 1 and tokens[0] in NUMBERS:
        return Fraction(tokens[0])
    return evaluate(tokens[1:-1]) if len(tokens) > 2 and tokens[0] == "(" and tokens[-1] == ")" else None

@functools.cache
def solutions(values, ops, target=None):
    """{value: {tokens: precedence}} of formulas using each of the sorted `values` once; only target's if given."""
    if len(values) == 1:
        return {Fraction(values[0]): {(str(values[0]),): 3}}
    out = {}
    for mask in range(1, 2 ** len(values) - 1):  # each split of the values into a left and a right operand
        parts = (tuple(v for k, v in enumerate(values) if mask >> k & 1 == side) for side in (1, 0))
        for op, (a, fa), (b, fb) in itertools.product(ops, *(solutions(part, ops).items() for part in parts)):
            if (op == "/" and b == 0) or (target is not None and OPS[op](a, b) != target):
                continue
            prec = 1 if op in "+-" else 2  # precedence of a sum, of a product (a number: 3); brackets where needed:
            for (ta, pa), (tb, pb) in itertools.product(fa.items(), fb.items()):
                ta = ("(", *ta, ")") if pa < prec else ta  # (a + b) * c
                tb = ("(", *tb, ")") if pb < prec + (op in "-/") else tb  # a - (b + c), a / (b * c)
                out.setdefault(OPS[op](a, b), {})[ta + (op,) + tb] = prec
    return out

class _Formula(_Env):  # state: `cards`, a list of (rank, suit), and `formula`, the tokens so far
    image_size, default_noise = 112, 0.7  # EZPoints: as NumberLine's, SFT starts low (the paper's SFT: 23%)
    cards_at, in_order = (4, 24, 2), False  # first card's x, stride, y; in_order: plans, dead ends keep card order
    cot_fields = '"cards": "their values", "formula": "the tokens so far", "thoughts": "next"'
    values = property(lambda self: [VALUE[rank] for rank, _ in self.cards])

    def _deal(self):
        self.cards, self.formula, self.steps, self.total = self._cards(), [], 0, 0.0

    def step(self, action):
        token, n, values = self.action_names[self._check(action)], len(self.formula), self.values
        used = sorted(int(t) for t in self.formula if t in NUMBERS)
        solved = n <= self.max_len and used == sorted(values) and evaluate(self.formula) == self.target
        no_card = token in NUMBERS and self.formula.count(token) >= values.count(int(token))
        terminated = token == "=" or n > self.max_len  # a formula over max_len tokens: -1 whatever comes
        reward = (10.0 if solved else -1.0) if terminated else -1.0 if no_card else 0.0
        self.formula += [] if terminated or no_card else [token]
        self.steps, self.total = self.steps + 1, self.total + reward
        self.done = terminated or self.steps >= self.max_steps
        return self.render(), reward, terminated, self.done and not terminated, self.info(self.total > 0)

    def info(self, success):  # success: total reward > 0, the paper's measure (only a solved episode gets there)
        return {"success": success, "cards": self.values, "formula": list(self.formula), "steps": self.steps}

    def correct_action(self):  # on along the shortest solution the formula begins (in_order: ordered first), else "="
        n, found = len(self.formula), solutions(tuple(sorted(self.values)), self.ops, self.target)
        order = lambda s: (self.in_order and [int(t) for t in s if t in NUMBERS] != self.values, len(s))
        plan = min((s for s in found.get(self.target, ()) if list(s[:n]) == self.formula), key=order, default=())
        if not plan and self.in_order:  # no solution left (-1 whatever comes): the unused cards in order, "+" between
            left = [v for k, v in enumerate(self.values) if self.values[:k + 1].count(v) > self.formula.count(str(v))]
            plan = self.formula + ["+" if "".join(self.formula[-1:]) in NUMBERS + [")"] else str(v) for v in left[:1]]
        return self.action_names.index(plan[n] if len(plan) > n else "=")

    def cot_values(self):
        token, complete = self.action_names[self.correct_action()], evaluate(self.formula) == self.target
        return [("cards", " ".join(map(str, self.values))), ("formula", " ".join(self.formula) or "empty"),
                ("thoughts", f"next {token}" if token != "=" else "complete" if complete else "stuck")]

    def render(self):  # the cards, then the formula: a token per 14-px cell, the tiny model's patch, 8 a row
        draw = ImageDraw.Draw(img := Image.new("RGB", (self.image_size,) * 2, (0, 110, 50)))
        for i, card in enumerate(self.cards):
            _draw_card(draw, self.cards_at[0] + self.cards_at[1] * i, self.cards_at[2], card)
        draw.text((2, 31), "Formula:", fill="white", font=_font(10))
        for k, token in enumerate(self.formula):  # black on white, like the cards' ranks: legible to a tiny model
            x, y = 14 * (k % 8), 42 + 14 * (k // 8)
            draw.rectangle((x, y, x + 13, y + 13), fill="white")
            draw.text((x + 7, y + 7), token, fill="black", font=_font(12), anchor="mm")
        return img

class EZPoints(_Formula):
    name, target, ops, max_len, max_steps, action_names = "ezpoints", 12, "+*", 5, 14, NUMBERS + list("+*=")
    task = 'Build a formula worth 12 from the 2 cards, each used once (J, Q, K are 10), token by token; "=" ends it.'

    def _cards(self):  # the second value makes 12 with the first: 12 / v on a coin flip when whole, else 12 - v
        v = VALUE[first := RANKS[self.rng.randint(1, 12)]]  # ranks 2 .. K
        w = 12 // v if v in (1, 2, 3, 4, 6) and self.rng.random() < 0.5 else 12 - v
        ranks = [first, RANKS[w - 1] if w < 10 else self.rng.choice(RANKS[9:])]  # a 10 is any of 10, J, Q, K
        return [(rank, self.rng.choice(SUITS)) for rank in self.rng.sample(ranks, 2)]

class Points24(_Formula):
    name, target, ops, max_len, max_steps, action_names = "points24", 24, "+-*/", 20, 24, NUMBERS + list("+-*/()=")
    task = 'Build a formula worth 24 from the 4 cards, each used once (J, Q, K are 10), token by token; "=" ends it.'
    default_noise = 0.3  # up to 12 steps to a solution: at 0.7 the demonstrator would hardly ever show a whole one
    cards_at, in_order = (11, 28, 0), True  # ranks centred in 14-px patches, learnable plans (README.md: why)

    def _cards(self):  # nothing guarantees a solution: about 73% of deals have one
        return [(self.rng.choice(RANKS), self.rng.choice(SUITS)) for _ in range(4)]
