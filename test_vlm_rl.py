"""Tests of vlm_rl.py, envs.py and scripts/, in the order of the method: the games and their
demonstrator, the prompt and its parser, the lambda log-prob, GAE and the PPO loss, the tiny model
through the real code path, the training loop, the command line, fixes found by review,
checkpoints, precision and LoRA, torchrun, other VLM architectures, and the scripts.

    python -m pytest -q -m "not slow" test_vlm_rl.py   # about a minute on 2 idle cores
    python -m pytest -q test_vlm_rl.py                  # + end-to-end runs, torchrun, reproduce.py
    VLM_RL_SLOW=1 python -m pytest -q test_vlm_rl.py    # + the 5-15 minute SFT legibility check

Each test's docstring says what it proves. References are computed independently of the code under
test: brute force, Python's own parser, dynamic programming, hand-played episodes.
"""
import ast
import copy
import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PreTrainedTokenizerFast

import curve
import episodes
import policy_map
import reproduce
import vlm_rl
from envs import (BLANK, NUMBERS, OPS, RANKS, VALUE, Blackjack, EZPoints, NumberLine, Points24,
                  _Env, blackjack_optimal, evaluate, hand_value, solutions)
from vlm_rl import action_token_mask, answer_logprob, gae, parse_action, ppo_loss

HERE = os.path.dirname(os.path.abspath(__file__))


# --- Fixtures: the tiny model, built once per game

@pytest.fixture(scope="session", autouse=True)
def tiny_models_built_once():
    """vlm_rl.build_tiny_model renders ~10,000 game pictures on the way to its tokenizer's corpus
    (seconds), and the tests build the same (game, seed) model over and over. Here each is built
    once by the real function; every call then gets a fresh deep copy of it (its own weights to
    train) and the global torch RNG state the real function leaves (load_agent draws the value
    head and LoRA from it). So a copy is what the real call returns: the end-to-end test compares
    a run in this process with one by the real command in another."""
    real = vlm_rl.build_tiny_model
    built = {}

    def build_once(env_cls, seed=0):
        if (env_cls, seed) not in built:
            vlm, processor = real(env_cls, seed)
            built[env_cls, seed] = copy.deepcopy((vlm, processor)), torch.get_rng_state()
        (vlm, processor), rng_state = built[env_cls, seed]
        torch.set_rng_state(rng_state)
        return copy.deepcopy(vlm), copy.deepcopy(processor)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vlm_rl, "build_tiny_model", build_once)
        yield


def new_agent(*flags, env_cls=NumberLine):
    """(agent, config): a tiny agent of its own, for a test that trains it."""
    cfg, _ = vlm_rl.parse_config(["--env", env_cls.name, "--device", "cpu", *flags])
    torch.manual_seed(0)
    return vlm_rl.load_agent(cfg, env_cls), cfg


@pytest.fixture(scope="session")
def tiny(tiny_models_built_once):
    """(agent, config): the default tiny NumberLine agent in eval mode, shared by the tests that
    only read it (sample, score, evaluate); a test that trains takes new_agent() instead."""
    agent, cfg = new_agent()
    return agent.eval(), cfg


# --- NumberLine

def numberline(current, target):
    env = NumberLine()
    env.reset(seed=0)
    env.current = current
    env.target = target
    return env


def test_numberline_moves_and_rewards():
    """A step toward the target earns 0, a step away -1, reaching it +1 and ends the episode."""
    env = numberline(1, 3)
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc, info["current"], info["success"]) == (0.0, False, False, 2, False)
    _, r, _, _, _ = env.step(0)
    assert r == -1.0 and env.current == 1
    env.step(1)
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc, info["success"], info["steps"]) == (1.0, True, False, True, 4)


def test_numberline_blocked_at_edges():
    """At 0 or 5 a step off the line does not move and costs -1."""
    env = numberline(0, 3)
    _, r, term, _, _ = env.step(0)
    assert (r, term, env.current) == (-1.0, False, 0)
    env = numberline(5, 2)
    _, r, _, _, _ = env.step(1)
    assert (r, env.current) == (-1.0, 5)


def test_numberline_truncates_at_ten_steps():
    """The 10th step without reaching the target truncates; a step after it is an error."""
    env = numberline(2, 4)
    for i in range(10):
        _, r, term, trunc, info = env.step(0)
        assert not term and trunc == (i == 9) and not info["success"]
    with pytest.raises(RuntimeError):
        env.step(0)


def test_numberline_start_differs_and_seed_determinism():
    """No episode starts solved; a seed fixes the deal and its 56-px RGB picture."""
    env = NumberLine()
    for _ in range(500):
        _, info = env.reset()
        assert info["current"] != info["target"] and 0 <= info["current"] <= 5
    img1, info1 = env.reset(seed=7)
    img2, info2 = NumberLine().reset(seed=7)
    assert info1 == info2 and img1.tobytes() == img2.tobytes()
    assert img1.size == (56, 56) and img1.mode == "RGB"


def test_bad_action_and_step_after_done():
    """Stepping before reset() or after the end is a RuntimeError; an action out of range a
    ValueError."""
    env = NumberLine()
    with pytest.raises(RuntimeError):
        env.step(0)  # never reset
    env.reset(seed=1)
    for bad in (-1, 2):
        with pytest.raises(ValueError):
            env.step(bad)
    env = numberline(3, 4)
    env.step(1)
    with pytest.raises(RuntimeError):
        env.step(1)


# --- Blackjack

def cards(*ranks):
    return [(r, "spades") for r in ranks]


def blackjack(player, dealer, seed=0):
    env = Blackjack()
    env.reset(seed=seed)
    env.player = cards(*player)
    env.dealer = cards(*dealer)
    return env


def test_hand_value_usable_ace():
    """An ace counts 11 while that does not bust the hand (a soft total), else 1."""
    assert hand_value(cards("A", "6")) == (17, True)
    assert hand_value(cards("A", "6", "9")) == (16, False)
    assert hand_value(cards("A", "A")) == (12, True)
    assert hand_value(cards("A", "K")) == (21, True)
    assert hand_value(cards("K", "Q", "5")) == (25, False)


def test_hit_bust_and_safe_hit():
    """A hit over 21 loses at once; a hit under it draws a card and goes on."""
    env = blackjack(["K", "Q"], ["5", "5"])
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc, info["success"]) == (-1.0, True, False, False)
    env = blackjack(["2", "3"], ["5", "5"])
    _, r, term, _, info = env.step(1)
    assert (r, term, len(info["player"])) == (0.0, False, 3)


def test_dealer_stands_on_soft_17_and_hits_16():
    """Gymnasium's dealer: stands on 17, soft 17 included; draws on 16."""
    env = blackjack(["10", "8"], ["A", "6"])
    _, r, term, _, info = env.step(0)
    assert len(env.dealer) == 2 and (r, term, info["success"]) == (1.0, True, True)
    env = blackjack(["10", "8"], ["10", "6"])
    env.step(0)
    assert len(env.dealer) >= 3


@pytest.mark.parametrize("player, dealer, reward", [
    (["10", "9"], ["10", "8"], 1.0),
    (["10", "8"], ["10", "8"], 0.0),
    (["10", "7"], ["10", "8"], -1.0),
    (["10", "2"], ["10", "6"], 1.0),
])
def test_stand_comparison(player, dealer, reward):
    """Standing compares totals: higher wins, equal draws, lower loses, a dealer bust wins."""
    env = blackjack(player, dealer)
    env._draw = lambda: ("K", "clubs")  # the dealer's 16 draws a K and busts
    _, r, term, _, info = env.step(0)
    assert (r, term, info["success"]) == (reward, True, reward > 0)


def test_dp_reference_values():
    """The exact DP optimum matches the known figures (win 42.95%, draw 9.45%, loss 47.60%;
    always standing wins 38.07%) and the textbook decisions."""
    win, draw, loss = policy_map.blackjack_outcomes(blackjack_optimal())
    assert abs(win - 0.4295) < 1e-3 and abs(draw - 0.0945) < 1e-3 and abs(loss - 0.4760) < 1e-3
    stand = policy_map.blackjack_outcomes({k: 0 for k in blackjack_optimal()})
    assert abs(stand[0] - 0.3807) < 1e-3
    policy = blackjack_optimal()
    assert policy[(20, False, 10)] == 0 and policy[(11, False, 10)] == 1
    assert policy[(12, True, 5)] == 1


def test_monte_carlo_matches_dp():
    """20,000 episodes of the env played by the DP policy win at the DP's rate: the env and the
    DP follow the same rules."""
    env = Blackjack()
    env.render = lambda: None  # pictures are tested elsewhere; drawing 50k of them costs ~15 s
    env.reset(seed=123)
    wins = 0
    n = 20000
    for _ in range(n):
        env.reset()
        while True:
            *_, term, _, info = env.step(env.correct_action())
            if term:
                wins += info["success"]
                break
    assert abs(wins / n - policy_map.blackjack_outcomes(blackjack_optimal())[0]) < 0.015


def test_blackjack_rendering():
    """A 112-px RGB picture that shows the cards; seven cards still fit."""
    env = Blackjack()
    img, _ = env.reset(seed=3)
    assert img.size == (112, 112) and img.mode == "RGB"
    env.player = cards("2", "3")
    a = env.render().tobytes()
    env.player = cards("K", "3")
    assert env.render().tobytes() != a
    env.player = cards("A", "A", "2", "2", "3", "10", "Q")
    assert env.render().size == (112, 112)


# --- EZPoints and Points24 rules, step by step

def deal(cls, *ranks, formula=""):
    """A game with these cards and formula ("_": a blank, the entry of a mistaken number)."""
    env = cls()
    env.reset(seed=0)
    env.cards = [(r, "hearts") for r in ranks]
    env.formula = [BLANK if t == "_" else t for t in formula.split()]
    return env


def play(env, tokens):
    """Step through space-separated tokens; return each step's (reward, terminated, truncated,
    info)."""
    return [env.step(env.action_names.index(t))[1:] for t in tokens.split()]


def test_mistaken_number_costs_one_and_takes_a_slot_that_equals_ignores():
    """The paper's rule: a number not on a card (3) or whose cards are used up (the third 6) costs
    -1 and appends a blank entry; "=" evaluates the formula without its blanks."""
    steps = play(deal(EZPoints, "6", "6"), "6 3 + 6 6 =")
    assert [s[0] for s in steps] == [0.0, -1.0, 0.0, 0.0, -1.0, 10.0]
    assert [s[3]["formula"] for s in steps[:5]] == [
        ["6"], ["6", " "], ["6", " ", "+"], ["6", " ", "+", "6"], ["6", " ", "+", "6", " "]]
    assert not any(s[1] or s[2] for s in steps[:5]) and steps[-1][3]["success"]  # total 8 > 0
    # J and Q count 10; one ace
    steps = play(deal(Points24, "A", "10", "J", "Q"), "10 10 10 10 1 1")
    assert [s[0] for s in steps] == [0.0, 0.0, 0.0, -1.0, 0.0, -1.0]
    assert steps[-1][3]["formula"] == ["10", "10", "10", " ", "1", " "]
    # Blanks anywhere, even inside brackets, are ignored by "=" (and never join two numbers).
    steps = play(deal(Points24, "A", "2", "3", "4"), "( 1 + 5 2 + 3 ) 5 * 4 5 =")
    assert steps[-1][:3] == (10.0, True, False) and steps[-1][3]["success"]  # total 7
    assert steps[-2][3]["formula"] == [BLANK if t == "_" else t
                                       for t in "( 1 + _ 2 + 3 ) _ * 4 _".split()]
    steps = play(deal(Points24, "2", "4", "A", "A"), "2 5 4 * 1 * 1 =")
    assert steps[-1][:3] == (-1.0, True, False)


def test_ezpoints_two_mistakes_fit_a_third_ends_the_episode_at_minus_one():
    # "2 + 10" and two blanks: 5 entries, the limit. Solved, total 8.
    steps = play(deal(EZPoints, "2", "K"), "2 5 + 5 10 =")
    assert [s[0] for s in steps] == [0.0, -1.0, 0.0, -1.0, 0.0, 10.0] and steps[-1][3]["success"]
    # A third mistake makes 6 entries: still written, but the next step ends at -1, whatever it
    # is.
    env = deal(EZPoints, "2", "K")
    steps = play(env, "5 5 5 2 + 10")
    assert [s[:3] for s in steps] == [(-1.0, False, False)] * 3 + [(0.0, False, False)] * 3
    assert len(env.formula) == 6 and env.written == ["2", "+", "10"]
    for token in EZPoints.action_names:
        env = deal(EZPoints, "2", "K", formula="2 + 10 _ _ _")
        _, reward, term, trunc, info = env.step(EZPoints.action_names.index(token))
        assert (reward, term, trunc, info["success"]) == (-1.0, True, False, False)
        assert len(env.formula) == 6  # nothing more is written
        with pytest.raises(RuntimeError):
            env.step(0)


def test_points24_formula_of_at_most_20_entries_blanks_included():
    # A valid formula of 19 tokens scores; one of 21 tokens does not, nor one of 19 tokens and 2
    # blanks.
    for pairs, blanks, reward in ((6, 0, 10.0), (6, 1, 10.0), (7, 0, -1.0), (6, 2, -1.0)):
        formula = "( " * pairs + "1 * 2" + " )" * pairs + " * 3 * 4"
        assert len(formula.split()) == 7 + 2 * pairs
        steps = play(deal(Points24, "A", "2", "3", "4"), "5 " * blanks + formula + " =")
        assert steps[-1][:3] == (reward, True, False)
    # 7 tokens and 13 blanks: +10, but success is the paper's total reward > 0 (here 10 - 13).
    for blanks, reward, success in ((9, 10.0, True), (10, 10.0, False), (13, 10.0, False),
                                    (14, -1.0, False)):
        steps = play(deal(Points24, "A", "2", "3", "4"), "5 " * blanks + "1 * 2 * 3 * 4 =")
        assert steps[-1][:3] == (reward, True, False) and steps[-1][3]["success"] == success


def test_every_step_but_equals_takes_a_slot_so_episodes_need_no_time_limit():
    for cls, ranks in ((EZPoints, ("2", "10")), (Points24, ("A", "2", "3", "4"))):
        # max_len + 1 entries, then any step ends it
        env, longest = deal(cls, *ranks), cls.max_len + 2
        steps = play(env, " ".join(["5"] * longest))
        assert [s[0] for s in steps] == [-1.0] * longest and env.max_steps == longest
        assert [s[1] for s in steps] == [False] * (longest - 1) + [True]
        assert not any(s[2] for s in steps)
        assert not steps[-1][3]["success"]
        with pytest.raises(RuntimeError):
            env.step(0)
    env, rng = Points24(), random.Random(0)  # random play: never truncated, never longer
    env.render = lambda: None
    for s in range(300):
        env.reset(seed=s)
        while not env.done:
            *_, trunc, _ = env.step(rng.randrange(len(env.action_names)))
            assert not trunc and env.steps <= env.max_steps == 22


# --- EZPoints and Points24: formulas that win and formulas that fail

def test_ezpoints_solved_step_by_step():
    """Tokens before "=" earn 0; "=" on 2 + 10 earns 10 and ends the episode, in either order."""
    env = deal(EZPoints, "2", "K")
    steps = play(env, "2 + 10 =")
    assert [s[:3] for s in steps] == [(0.0, False, False)] * 3 + [(10.0, True, False)]
    assert steps[-1][3] == {"success": True, "cards": [2, 10], "formula": ["2", "+", "10"],
                            "steps": 4}
    assert not any(s[3]["success"] for s in steps[:-1])
    with pytest.raises(RuntimeError):
        env.step(0)
    assert play(deal(EZPoints, "3", "4"), "4 * 3 =")[-1][:3] == (10.0, True, False)


@pytest.mark.parametrize("cls, ranks, tokens", [
    (EZPoints, ("2", "10"), "2 * 10 ="),                          # well formed, both cards, but 20
    (EZPoints, ("2", "10"), "="),                                 # empty
    (EZPoints, ("2", "10"), "2 + ="),                             # not well formed
    (EZPoints, ("6", "6"), "6 * 6 ="),
    (Points24, ("3", "8", "A", "A"), "3 * 8 ="),                  # 24, but two cards unused
    (Points24, ("2", "4", "A", "A"), "2 4 * 1 * 1 ="),            # "2" "4" is not 24 (the paper's
                                                                  # eval said it was)
    (Points24, ("A", "A", "2", "10"), "10 / ( 1 - 1 ) + 2 ="),    # division by zero
    (Points24, ("A", "2", "3", "4"), "1 + 2 + 3 * 4 ="),          # 15: * before +
    (Points24, ("A", "2", "3", "4"), "( 1 + 2 + 3 * 4 ="),        # unclosed bracket
    (Points24, ("A", "2", "3", "4"), "- 1 + 2 + 3 * 4 ="),        # no unary minus
    (Points24, ("A", "2", "3", "4"), "( 1 + 2 + 3 ) ) * ( 4 ="),  # brackets in the wrong places
    (Points24, ("A", "2", "3", "4"), "1 2 3 4 ="),
])
def test_wrong_formula_ends_at_minus_one(cls, ranks, tokens):
    """"=" after anything but a well-formed formula of every card worth the target: -1, the end."""
    steps = play(deal(cls, *ranks), tokens)
    assert all(s[:3] == (0.0, False, False) for s in steps[:-1])
    assert steps[-1][:3] == (-1.0, True, False) and not steps[-1][3]["success"]


@pytest.mark.parametrize("ranks, tokens", [
    (("A", "2", "3", "4"), "( 1 + 2 + 3 ) * 4 ="),
    (("A", "2", "3", "4"), "( ( 1 ) + ( 2 + 3 ) ) * ( 4 ) ="),   # redundant brackets are fine
    (("A", "A", "2", "K"), "( 2 + 10 ) * ( 1 + 1 ) ="),
    (("3", "3", "8", "8"), "8 / ( 3 - 8 / 3 ) ="),                # exact: 8 / (1/3)
    (("8", "2", "3", "3"), "8 / 2 * ( 3 + 3 ) ="),                 # left to right: (8 / 2) * 6
    (("4", "4", "10", "10"), "( 10 * 10 - 4 ) / 4 ="),
])
def test_points24_solved_with_brackets_and_fractions(ranks, tokens):
    """Brackets, redundant ones too, and exact fractions: each formula is worth 24 and wins."""
    steps = play(deal(Points24, *ranks), tokens)
    assert steps[-1][:3] == (10.0, True, False) and steps[-1][3]["success"]


def test_formula_games_bad_action_and_seed_determinism():
    """As NumberLine: errors before reset() and out of range; a seed fixes deal and picture; the
    action names are the numbers 1..10, the operators, then "="."""
    for cls in (EZPoints, Points24):
        env = cls()
        with pytest.raises(RuntimeError):
            env.step(0)  # never reset
        img1, info1 = env.reset(seed=7)
        img2, info2 = cls().reset(seed=7)
        assert info1 == info2 and img1.tobytes() == img2.tobytes() and info1["formula"] == []
        for bad in (-1, len(cls.action_names)):
            with pytest.raises(ValueError):
                env.step(bad)
    assert EZPoints.action_names == NUMBERS + ["+", "*", "="]
    assert len(EZPoints.action_names) == 13
    assert Points24.action_names == NUMBERS + ["+", "-", "*", "/", "(", ")", "="]
    assert len(Points24.action_names) == 17


# --- The formula evaluator against Python's own parser
# (allowed here only: envs.py never evaluates text)

def reference(tokens):
    """Value by Python's ast of the joined tokens, keeping only + - * / of int literals and
    brackets."""
    try:
        tree = ast.parse(" ".join(tokens), mode="eval").body
    except SyntaxError:
        return None
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if not isinstance(node, ast.BinOp) or type(node.op) not in ops:
            raise ValueError(ast.dump(node))
        a = value(node.left)
        b = value(node.right)
        return OPS[ops[type(node.op)]](a, b)

    try:
        return value(tree)
    except (ValueError, ZeroDivisionError):
        return None


def random_formula(rng, depth):
    """(tokens, exact value or None after a division by zero) of a random well-formed formula."""
    if depth == 0 or rng.random() < 0.3:
        number = rng.choice(NUMBERS)
        return [number], Fraction(number)
    op = rng.choice("+-*/")
    ta, a = random_formula(rng, depth - 1)
    tb, b = random_formula(rng, depth - 1)
    # Every operand is bracketed, so the value is the tree's whatever the precedence rules.
    value = None if a is None or b is None or (op == "/" and b == 0) else OPS[op](a, b)
    return ["(", *ta, ")", op, "(", *tb, ")"], value


def test_evaluator_hand_cases():
    """Precedence, left to right, exact fractions; a malformed list or a division by 0: None."""
    assert evaluate(["2", "4"]) is None and evaluate("2 * 4 + 4 * 4".split()) == 24
    assert evaluate("1 - 2 - 3".split()) == -4 and evaluate("8 / 2 / 2".split()) == 2
    assert evaluate("8 / 3".split()) == Fraction(8, 3)
    assert evaluate("1 / ( 2 - 2 )".split()) is None
    for bad in ["", "( )", "+", "1 +", "( 1", "1 )", ") 1 (", "- 1", "1 ( 2 )", "( 1 ) ( 2 )",
                "1 * * 2"]:
        assert evaluate(bad.split()) is None, bad


def test_evaluator_matches_python_ast_on_random_token_lists():
    """6,000 token lists (bracketed trees, bare chains, garbage) valued as Python's parser values
    them; each kind well represented."""
    rng = random.Random(0)
    kinds = {"tree": 0, "chain": 0, "garbage": 0}
    alphabet = NUMBERS + list("+-*/()")
    for i in range(6000):
        tokens, value = random_formula(rng, 3)
        if i % 3 == 0:
            # a bracketed tree: its own value, also with the brackets around numbers dropped
            assert evaluate(tokens) == value, tokens
            tokens = " ".join(tokens)
            for number in NUMBERS:
                tokens = tokens.replace(f"( {number} )", number)
            tokens = tokens.split()
            assert evaluate(tokens) == value, tokens
        elif i % 3 == 1:  # no brackets: precedence and left-to-right order decide
            length = 2 * rng.randrange(5) + 1
            tokens = [rng.choice(NUMBERS) if k % 2 == 0 else rng.choice("+-*/")
                      for k in range(length)]
        elif rng.random() < 0.5:  # garbage: random tokens, or a random edit of a well-formed list
            tokens = [rng.choice(alphabet) for _ in range(rng.randrange(8))]
        else:
            k = rng.randrange(len(tokens) + 1)
            tokens[k:k + rng.randrange(2)] = [rng.choice(alphabet)] * rng.randrange(3)
        expected = reference(tokens)
        assert evaluate(tokens) == expected == evaluate(tuple(tokens)), tokens
        kinds[("tree", "chain", "garbage")[i % 3]] += expected is not None
    assert kinds["tree"] > 1500 and kinds["chain"] > 1500, kinds
    assert 100 < kinds["garbage"] < 1000, kinds


# --- The solver against an independent brute force

def solvable(values, target=24, ops="+-*/"):
    return bool(solutions(tuple(sorted(values)), ops, target).get(target))


@functools.cache
def brute_force(values, target=24):
    """Combine any two numbers with + - * / until one is left (sorted tuples of Fractions)."""
    if len(values) == 1:
        return values[0] == target
    for i, j in itertools.permutations(range(len(values)), 2):
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        a = values[i]
        b = values[j]
        for c in [a + b, a - b, a * b] + ([a / b] if b else []):
            if brute_force(tuple(sorted(rest + [c])), target):
                return True
    return False


@pytest.mark.slow
def test_solver_counts_solvable_deals_and_its_solutions_are_right():
    """566 of the 715 multisets of 1..10 make 24 (the known count), the same ones as brute force
    finds, and every solution listed is worth 24 and uses exactly the cards; 1236 of 1820 rank
    multisets; 73.09% of the env's deals, as 3,000 dealt ones confirm."""
    multisets = list(itertools.combinations_with_replacement(range(1, 11), 4))
    ours = {m: solvable(m) for m in multisets}
    assert sum(ours.values()) == 566 and len(multisets) == 715  # the known count for 1..10
    assert ours == {m: brute_force(tuple(map(Fraction, m))) for m in multisets}
    for m in multisets:
        for tokens in solutions(m, "+-*/", 24).get(24, ()):
            assert evaluate(tokens) == 24
            assert sorted(int(t) for t in tokens if t in NUMBERS) == list(m)
    # Cards: ranks 1..13 with J, Q, K worth 10; 1236 of the 1820 rank multisets have a solution.
    ranks = list(itertools.combinations_with_replacement(range(1, 14), 4))
    assert len(ranks) == 1820
    assert sum(ours[tuple(sorted(min(r, 10) for r in m))] for m in ranks) == 1236
    # Under the env's dealing (each rank 1/13, so a 10 is 4/13): 73.09% of deals are solvable.
    p = {v: (4 if v == 10 else 1) / 13 for v in range(1, 11)}
    share = sum(math.prod(p[v] for v in vals)
                for vals in itertools.product(range(1, 11), repeat=4) if ours[tuple(sorted(vals))])
    assert abs(share - 0.7309) < 1e-4
    env = Points24()
    env.render = lambda: None
    n = 3000
    dealt = sum(solvable(env.reset(seed=s)[1]["cards"]) for s in range(n))
    assert abs(dealt / n - share) < 0.025


def test_solver_brackets_only_where_needed():
    """Solutions carry no redundant outer brackets; both orders of a commutative pair; unsolvable
    deals have none."""
    found = solutions((1, 2, 3, 4), "+-*/", 24)[24]
    assert ("1", "*", "2", "*", "3", "*", "4") in found
    assert ("(", "1", "+", "2", "+", "3", ")", "*", "4") in found
    assert not any(t[0] == "(" and t[-1] == ")" and evaluate(t[1:-1]) is not None for t in found)
    assert ("8", "/", "(", "3", "-", "8", "/", "3", ")") in solutions((3, 3, 8, 8), "+-*/", 24)[24]
    assert set(solutions((2, 10), "+*", 12)[12]) == {("2", "+", "10"), ("10", "+", "2")}
    assert set(solutions((2, 6), "+*", 12)[12]) == {("2", "*", "6"), ("6", "*", "2")}
    assert not solvable((1, 1, 1, 1)) and not solvable((1, 1, 1, 2))


# --- EZPoints and Points24: dealing and pictures

def test_ezpoints_deals_are_always_solvable_with_the_papers_distribution():
    """Every EZPoints deal makes 12 by a sum or a product: the paper's 7 pairs, products 1 in 6,
    shown in random order, a 10 drawn as any of 10 J Q K and never an ace."""
    env = EZPoints()
    env.render = lambda: None
    n = 3000
    pairs = set()
    products = 0
    first_left = 0
    for s in range(n):
        _, info = env.reset(seed=s)
        a, b = info["cards"]
        assert a + b == 12 or a * b == 12
        assert all(rank in RANKS for rank, _ in env.cards)
        pairs.add(tuple(sorted((a, b))))
        products += a * b == 12 and a + b != 12
        first_left += (a, b) == tuple(sorted((a, b)))
    assert pairs == {(2, 10), (3, 9), (4, 8), (5, 7), (6, 6), (2, 6), (3, 4)}
    assert abs(products / n - 1 / 6) < 0.025  # card 1 in {2, 3, 4, 6} (4 of 12 ranks), then heads
    assert 0.4 < first_left / n < 0.7  # shown in random order
    ranks = set()
    for s in range(300):
        env.reset(seed=s)
        ranks |= {rank for rank, _ in env.cards}
    assert {"10", "J", "Q", "K"} <= ranks and "A" not in ranks  # a 10 is any of 10, J, Q, K


def test_points24_deals_four_uniform_ranks():
    """Points24 deals 4 cards of uniformly drawn ranks; `values` are their values."""
    env = Points24()
    env.render = lambda: None
    counts = {r: 0 for r in RANKS}
    for s in range(2000):
        env.reset(seed=s)
        assert len(env.cards) == 4
        for rank, _ in env.cards:
            counts[rank] += 1
    assert all(abs(c / 8000 - 1 / 13) < 0.015 for c in counts.values())
    assert env.values == [VALUE[r] for r, _ in env.cards]


@pytest.mark.parametrize("cls", [EZPoints, Points24])
def test_formula_rendering(cls):
    """112-px pictures: one per deal, different deals look different, every token of the longest
    formula shows, and the ended formula stays on the picture."""
    env = cls()
    img, _ = env.reset(seed=3)
    assert img.size == (cls.image_size,) * 2 == (112, 112) and img.mode == "RGB"
    pictures = {}
    for s in range(40):
        img, _ = env.reset(seed=s)
        assert pictures.setdefault(tuple(env.cards), img.tobytes()) == img.tobytes()
    assert len(set(pictures.values())) == len(pictures) > 20  # different deals, different pictures
    # Every token of the longest formula the rules allow shows up (Points24: 3 lines of 7 tokens).
    env.cards = [("10", "hearts"), ("Q", "spades"), ("7", "clubs"),
                 ("K", "diamonds")][:len(env.cards)]
    others = [a for a in cls.action_names if a not in NUMBERS + ["="]]
    tokens = [others[k // 2 % len(others)] if k % 2 else "10" for k in range(cls.max_len + 1)]
    before = env.render().tobytes()
    for k in range(1, len(tokens) + 1):
        env.formula = tokens[:k]
        after = env.render().tobytes()
        assert after != before, k
        before = after
    env.step(env.action_names.index("="))
    assert env.render().tobytes() == before  # the picture is the state: the ended formula stays


def test_a_blank_is_drawn_as_an_empty_white_cell():
    env = deal(EZPoints, "2", "K", formula="2")
    pictures = []
    for formula in (["2"], ["2", BLANK], ["2", "+"]):
        env.formula = formula
        pictures.append(env.render())
    # a taken slot differs from a free one and from a token
    assert len({p.tobytes() for p in pictures}) == 3
    # the second cell
    assert pictures[1].crop((14, 42, 28, 56)).getcolors() == [(14 * 14, (255, 255, 255))]


# --- The demonstrator

def test_demo_noise_zero_is_correct_with_ordered_fields():
    """Without noise the demonstration is the correct action, its reasoning fields first, the
    action last, in the fixed spacing SFT teaches."""
    rng = random.Random(0)
    env = numberline(1, 4)
    assert env.demo(0, rng) == ('{"current number": "1", "target number": "4", '
                                '"thoughts": "1 < 4", "action": "+"}')
    env = blackjack(["A", "6"], ["10", "7"])
    assert env.demo(0, rng) == '{"thoughts": "dealer 10, me A 6 = soft 17", "action": "hit"}'
    for env in (NumberLine(), Blackjack()):
        for s in range(50):
            env.reset(seed=s)
            parsed = json.loads(env.demo(0.0, rng))
            assert list(parsed)[-1] == "action"
            assert parsed["action"] == env.action_names[env.correct_action()]
    parsed = json.loads(numberline(4, 2).demo(0, rng))
    assert list(parsed) == ["current number", "target number", "thoughts", "action"]
    assert parsed["thoughts"] == "4 > 2"


def test_demo_noise_one_wrong_and_no_cot():
    """Noise 1 always shows the wrong action; cot=False writes the action alone; noise outside
    [0, 1] is an error."""
    rng = random.Random(1)
    for env in (NumberLine(), Blackjack()):
        for s in range(50):
            env.reset(seed=s)
            right = env.action_names[env.correct_action()]
            wrong = env.action_names[1 - env.correct_action()]
            assert json.loads(env.demo(1.0, rng))["action"] == wrong
            assert env.demo(0.0, rng, cot=False) == f'{{"action": "{right}"}}'
        with pytest.raises(ValueError):
            env.demo(1.5, rng)


def test_demo_noise_fraction():
    """Noise 0.55: 45% of demonstrations are right."""
    rng = random.Random(2)
    env = NumberLine()
    env.reset(seed=0)
    right = env.action_names[env.correct_action()]
    hits = sum(json.loads(env.demo(0.55, rng, cot=False))["action"] == right for _ in range(2000))
    assert abs(hits / 2000 - 0.45) < 0.04


def test_formula_demo_answers_and_thoughts():
    """The formula games' demonstrator: the cards in the order shown, the formula so far, the next
    token of a solution it is on; "stuck" and "=" where none goes on (EZPoints); on Points24's
    dead ends the unused cards in order with "+" between, then "="."""
    rng = random.Random(0)
    env = deal(EZPoints, "2", "K")
    assert env.demo(0, rng) == ('{"cards": "2 10", "formula": "empty", "thoughts": "next 2", '
                                '"action": "2"}')
    env = deal(EZPoints, "K", "2", formula="2 +")  # the cards' values in the order shown
    assert env.demo(0, rng) == ('{"cards": "10 2", "formula": "2 +", "thoughts": "next 10", '
                                '"action": "10"}')
    env = deal(EZPoints, "K", "2", formula="10")  # another solution's prefix: it goes on with that
    assert json.loads(env.demo(0, rng))["action"] == "+"
    env = deal(EZPoints, "2", "K", formula="2 + 10")
    assert json.loads(env.demo(0, rng))["thoughts"] == "complete"
    env = deal(EZPoints, "2", "K", formula="2 *")  # a wrong token: no solution goes on from here
    assert json.loads(env.demo(0, rng)) == {"cards": "2 10", "formula": "2 *",
                                            "thoughts": "stuck", "action": "="}
    # no solution: the cards in order, "+" between (not "=" at once)
    env = deal(Points24, "A", "A", "A", "A")
    assert json.loads(env.demo(0, rng)) == {"cards": "1 1 1 1", "formula": "empty",
                                            "thoughts": "next 1", "action": "1"}
    # a dead end (Points24): it still ends the formula
    env = deal(Points24, "A", "A", "A", "A", formula="1 +")
    while not env.done:
        _, reward, *_ = env.step(env.correct_action())
    assert env.formula == "1 + 1 + 1 + 1".split() and reward == -1.0
    # the unused cards in order, "+" between them
    env = deal(Points24, "A", "K", "A", "A", formula="( 10 *")
    while not env.done:
        _, reward, *_ = env.step(env.correct_action())
    # not well formed: -1, as "=" at once
    assert env.formula == "( 10 * 1 + 1 + 1".split() and reward == -1.0
    env = deal(Points24, "A", "A", "A", "A", formula="1 + 1 + 1 + 1 *")  # every card used: "="
    assert json.loads(env.demo(0, rng))["action"] == "="
    env = deal(Points24, "3", "3", "8", "8")
    assert json.loads(env.demo(0, rng))["action"] == "8"
    assert list(json.loads(env.demo(0, rng, cot=True))) == ["cards", "formula", "thoughts",
                                                           "action"]
    assert env.demo(0, rng, cot=False) == '{"action": "8"}'
    for s in range(100):  # noise 1: always a legal action, never the right one
        env.reset(seed=s)
        action = json.loads(env.demo(1.0, rng))["action"]
        assert action in env.action_names and action != env.action_names[env.correct_action()]


@pytest.mark.parametrize("cls", [EZPoints, Points24])
def test_demonstrator_solves_every_solvable_deal(cls):
    """Played without noise for 500 deals, it wins exactly the deals the solver calls solvable
    (EZPoints: all, in 4 steps), and writes the cards in order on the others."""
    env = cls()
    env.render = lambda: None
    rng = random.Random(0)
    solved = 0
    lengths = []
    for s in range(500):
        _, info = env.reset(seed=s)
        has_solution = solvable(info["cards"], env.target, env.ops)
        for t in itertools.count(1):
            action = env.action_names.index(json.loads(env.demo(0, rng))["action"])
            _, reward, term, trunc, info = env.step(action)
            if term or trunc:
                break
        assert term and info["success"] == has_solution
        assert reward == (10.0 if has_solution else -1.0)
        # without a solution: the cards in order
        assert has_solution or env.formula == " + ".join(map(str, info["cards"])).split()
        solved += has_solution
        lengths.append(t)
    if cls is EZPoints:
        assert solved == 500 and set(lengths) == {4}
    else:  # 73% solvable; 4 numbers, 3 operators, 2 bracket pairs at most
        assert 340 < solved < 390 and max(lengths) <= 12


def test_points24_plans_keep_the_cards_in_picture_order():
    """Where some solution takes the cards in the order the picture shows them, the demonstrator
    plays one: a pattern a tiny model can learn (5% of deals are a + b + c + d). Elsewhere the
    shortest; no solution: the cards in order."""
    env = Points24()
    env.render = lambda: None
    kept = 0
    for s in range(300):
        _, info = env.reset(seed=s)
        found = solutions(tuple(sorted(info["cards"])), env.ops, 24).get(24, ())
        possible = any([int(t) for t in sol if t in NUMBERS] == info["cards"] for sol in found)
        while not env.done:
            env.step(env.correct_action())
        in_order = [int(t) for t in env.formula if t in NUMBERS] == info["cards"]
        assert in_order == (possible or not found), s
        kept += possible
    assert 110 < kept < 160  # 44% of deals


def test_noisy_demonstrator_at_0_7_solves_few_ezpoints_deals():
    """EZPoints' default noise 0.7 keeps SFT low, as the paper's (23%): played as an agent would
    (its answer parsed), the demonstrator solves at most 8% of deals (measured: 5.95% of 2000;
    19.4% under the rule this replaced, where a mistaken number took no slot and a 14-step time
    limit applied)."""
    env, rng, solved = EZPoints(), random.Random(0), 0
    env.render = lambda: None
    for s in range(2000):
        env.reset(seed=s)
        while not env.done:
            action, _ = vlm_rl.parse_action(env.demo(0.7, rng), env.action_names)
            *_, info = env.step(action)
        solved += info["success"]
    assert solved / 2000 <= 0.08


def test_formula_demo_goes_on_past_blanks_with_plans_that_still_fit():
    rng = random.Random(0)
    env = deal(EZPoints, "2", "K", formula="2 _ +")  # a blank shows as "_"; the plan skips it
    assert env.demo(0, rng) == ('{"cards": "2 10", "formula": "2 _ +", "thoughts": "next 10", '
                                '"action": "10"}')
    env = deal(EZPoints, "2", "K", formula="_ _ 2 +")  # 2 blanks and 3 tokens: 5 entries fit
    assert json.loads(env.demo(0, rng))["action"] == "10"
    env = deal(EZPoints, "2", "K", formula="_ _ _")  # 3 blanks: no solution fits any more
    assert json.loads(env.demo(0, rng)) == {"cards": "2 10", "formula": "_ _ _",
                                            "thoughts": "stuck", "action": "="}
    env = deal(EZPoints, "2", "K", formula="2 + 10 _ _")
    assert json.loads(env.demo(0, rng))["thoughts"] == "complete"
    # worth 12, but 6 entries: -1 whatever comes
    env = deal(EZPoints, "2", "K", formula="2 + 10 _ _ _")
    assert json.loads(env.demo(0, rng))["thoughts"] == "stuck"
    # Points24, 1 5 5 6: the plan in the cards' order takes 9 tokens, "5 * 6 - 1 - 5" 7; 20
    # entries in all.
    for blanks, first, formula, reward in ((11, "(", "( 1 + 5 ) * 5 - 6", 10.0),
                                           (12, "5", "5 * 6 - 1 - 5", 10.0),
                                           (13, "5", "5 * 6 - 1 - 5", 10.0),
                                           (14, "1", "1 + 5 + 5 + 6", -1.0)):
        env = deal(Points24, "A", "5", "5", "6", formula="_ " * blanks)
        assert json.loads(env.demo(0, rng))["action"] == first
        while not env.done:
            _, r, *_ = env.step(env.correct_action())
        # 14 blanks: a dead end, the cards in order
        assert env.written == formula.split() and r == reward
    # the dead end's "+" follows the number, not the blank
    env = deal(Points24, "A", "A", "A", "A", formula="1 _")
    assert json.loads(env.demo(0, rng))["action"] == "+"


@pytest.mark.parametrize("cls", [EZPoints, Points24])
def test_noisy_demonstrator_plays_whole_episodes(cls):
    """Whatever state its own mistakes lead to (dead ends, every card used, a dangling operator),
    it answers with a legal action, until the episode ends within the time limit."""
    env = cls()
    env.render = lambda: None
    rng = random.Random(0)
    for s in range(300):
        env.reset(seed=s)
        while not env.done:
            env.step(env.action_names.index(json.loads(env.demo(0.5, rng))["action"]))
        assert env.steps <= env.max_steps


# --- Prompt and parser

@pytest.mark.parametrize("text, expected", [
    ('{"thoughts": "1 < 4", "action": "+"}', 1),
    ('{"action":"-"}', 0),
    ('{"action" :  " + "}', 1),
    ('{"thoughts": "x", "action": "Stand"}', None),  # not a NumberLine action
    ('{"thoughts": "x", "action": "*"}', None),
    ('{"thoughts": "x"}', None),
    ("", None),
    ('{"action": "+", "action": "-"}', 1),  # the first one wins
    ('garbage "action": "-" trailing', 0),
])
def test_parse_action_numberline(text, expected):
    """The first "action" field's value, if a legal action; the split where '"action"' starts."""
    action, split = parse_action(text, ["-", "+"])
    assert action == expected
    if expected is not None:
        assert split == text.index('"action"')


def test_parse_action_split_and_words():
    """Whole words only, case ignored; no action field: the split is 0 (the whole answer counts
    as the action part)."""
    text = '{"thoughts": "dealer K, me 8 K = 18", "action": "stand"}'
    assert parse_action(text, ["stand", "hit"]) == (0, text.index('"action"'))
    assert parse_action('{"action": "standing"}', ["stand", "hit"])[0] is None
    assert parse_action('{"action": "HIT"}', ["stand", "hit"])[0] == 1
    assert parse_action("no json at all", ["stand", "hit"]) == (None, 0)


def test_parser_is_total_on_hostile_text():
    """>= 10,000 generated strings plus nasty cases: a legal action or None, never an exception,
    and a split inside the text (its work is bounded by reading 4096 characters at most; no
    timing asserted here)."""
    rng = random.Random(0)
    parts = ['"action"', '"action":', ': ', '"', "stand", "hit", "+", "-", "{", "}", "\\", "\n",
             " ", "é", "🂡", "\x00", '"thoughts": "', "action", "'", "[", "]", "null", "Stand",
             "standing", "\u202e", ",", "\\\""]
    cases = ["", "{", '{"action": ', '{"action": "', '{"action": "hit',
             '{"action": {"action": "hit"}}', '{"action": ["hit"]}',
             '{"action": "stand", "action": "hit"}', "__import__('os').system('true')",
             '{"action": "hit"' + "}" * 10000, "x" * 1_000_000, '"action": "' * 100_000,
             "🂡" * 300_000]
    cases += ["".join(rng.choice(parts) for _ in range(rng.randint(0, 30))) for _ in range(10_000)]
    for text in cases:
        action, split = parse_action(text, ["stand", "hit"])
        assert action in (None, 0, 1) and 0 <= split <= len(text)
        if action is not None:
            assert text.startswith('"action"', split)
    # the first wins
    assert parse_action('{"action": "stand", "action": "hit"}', ["stand", "hit"])[0] == 0


# --- The lambda log-prob: action_token_mask and answer_logprob against a per-token loop

@pytest.fixture(scope="session")
def answer_tokenizers():
    """A byte-level character tokenizer (no merges) and a BPE with many merges, trained by
    vlm_rl.train_bpe on two answers."""
    corpus = ['{"current number": "3", "target number": "1", "thoughts": "3 > 1", "action": "-"}',
              '{"thoughts": "dealer K, me 8 K = 18", "action": "stand"}'] * 50
    out = {}
    for name, vocab in (("characters", 256 + 3), ("bpe", 400)):
        bpe = vlm_rl.train_bpe(corpus, vocab, ["<pad>", "<s>", "</s>"])
        out[name] = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>",
                                            eos_token="</s>")
    return out


@pytest.mark.parametrize("which", ["characters", "bpe"])
def test_lambda_logprob_and_split_against_per_token_loop(which, answer_tokenizers):
    """log pi = lambda * (thought tokens' log-probs) + (action tokens' log-probs), the action
    tokens being those from the one whose text holds the start of '"action"' to the end (end of
    turn included): equal to a token-by-token loop over the decoded pieces, with or without
    merges, no action at all (then the whole answer is the action part), and -inf in the
    padding."""
    tok = answer_tokenizers[which]
    texts = ['{"current number": "3", "target number": "1", "thoughts": "3 > 1", "action": "-"}',
             '{"thoughts": "dealer K, me 8 K = 18", "action": "stand"}',
             '{"thoughts": "no action here"}',
             '{"thoughts": "x","action": "hit"}']
    ids = [torch.tensor(tok(t + "</s>", add_special_tokens=False)["input_ids"]) for t in texts]
    if which == "bpe":
        assert max(len(i) for i in ids) < len(texts[0]) // 2  # the BPE really merges
    splits = [parse_action(t, ["stand", "hit", "-", "+"])[1] for t in texts]
    mask = action_token_mask(tok, ids, splits)
    M = max(len(i) for i in ids)
    g = torch.Generator().manual_seed(0)
    token_logp = -torch.rand(len(texts), M, generator=g)
    valid = torch.zeros(len(texts), M, dtype=torch.bool)
    for b, i in enumerate(ids):
        valid[b, :len(i)] = True
    token_logp[~valid] = float("-inf")  # padding may hold -inf: must not give NaN
    lam = 0.3
    got = answer_logprob(token_logp, mask, valid, lam)
    for b, (i, text) in enumerate(zip(ids, texts)):
        start = max(text.find('"action"'), 0)  # no action field: the action part starts at 0
        seen = ""
        ref = 0.0
        for k, tid in enumerate(i.tolist()):
            piece = tok.decode([tid], skip_special_tokens=True)
            in_action = len(seen) + len(piece) > start or tid == tok.eos_token_id
            ref += (1.0 if in_action else lam) * token_logp[b, k].item()
            seen += piece
        assert math.isclose(got[b].item(), ref, rel_tol=1e-5), (which, text)
        # the first action token's text contains the start of '"action"' (or the answer's)
        k0 = int(mask[b].nonzero()[0])
        before = tok.decode(i[:k0].tolist(), skip_special_tokens=True)
        assert len(before) <= start < len(tok.decode(i[:k0 + 1].tolist()))
    assert mask[2, :len(ids[2])].all()  # no action field: every token is an action token


# --- GAE and the PPO loss

def brute_force_returns(rewards, dones, next_value, gamma):
    """Discounted return of each step, summed to the episode end or bootstrapped at the rollout
    end."""
    S, E = rewards.shape
    out = torch.zeros(S, E)
    for e in range(E):
        for t in range(S):
            g = 0.0
            k = t
            disc = 1.0
            while True:
                g += disc * rewards[k, e]
                if dones[k, e]:
                    break
                if k == S - 1:
                    g += disc * gamma * next_value[e]
                    break
                k += 1
                disc *= gamma
            out[t, e] = g
    return out


def test_gae_lambda_one_equals_discounted_returns_with_episode_ends():
    """GAE(lambda = 1): returns are the discounted sums, cut at episode ends and bootstrapped at
    the rollout's end; advantages are returns minus values."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 3, generator=g)
    values = torch.randn(7, 3, generator=g)
    dones = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0],
                          [0, 0, 1]]).float()
    next_value = torch.randn(3, generator=g)
    adv, ret = gae(rewards, values, dones, next_value, 0.9, 1.0)
    assert torch.allclose(ret, brute_force_returns(rewards, dones, next_value, 0.9), atol=1e-5)
    assert torch.allclose(adv, ret - values)


def test_gae_lambda_zero_is_one_step_td():
    """GAE(lambda = 0): the one-step TD error, no bootstrap across an episode end."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 2, generator=g)
    values = torch.randn(5, 2, generator=g)
    next_value = torch.randn(2)
    dones = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 1], [0, 0]]).float()
    adv, _ = gae(rewards, values, dones, next_value, 0.9, 0.0)
    nxt = torch.cat([values[1:], next_value[None]])
    assert torch.allclose(adv, rewards + 0.9 * nxt * (1 - dones) - values, atol=1e-6)


def test_ppo_loss_ratio_one_and_clipping():
    """At ratio 1 the policy loss is -mean(advantage); otherwise the pessimistic of the clipped
    and unclipped terms, per sample, with its gradient cut exactly where clipping wins."""
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    old = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    values = torch.zeros(4)
    returns = torch.ones(4)
    loss, pg, vl, st = ppo_loss(old.clone(), old, adv, values, returns, 0.1, 0.5)
    assert math.isclose(pg.item(), -adv.mean().item(), rel_tol=1e-6)
    assert math.isclose(vl.item(), 0.5)
    assert math.isclose(loss.item(), pg.item() + 0.25, rel_tol=1e-6)
    assert st["clip_frac"] == 0 and abs(st["approx_kl"]) < 1e-7
    ratios = [1.5, 1.5, 0.5, 0.95]
    logp = old + torch.log(torch.tensor(ratios))
    logp.requires_grad_(True)
    _, pg, _, st = ppo_loss(logp, old, adv, values, returns, 0.1, 0.5)
    ref = []
    for r, a in zip(ratios, adv.tolist()):
        ref.append(max(-a * r, -a * min(max(r, 0.9), 1.1)))
    assert math.isclose(pg.item(), sum(ref) / 4, rel_tol=1e-5)
    assert st["clip_frac"] == 0.75
    # only where the clipped term is the pessimistic one (sample 0) is the gradient cut
    pg.backward()
    assert logp.grad[0] == 0 and (logp.grad[1:] != 0).all()


# --- The tiny model through the real code path: what is sampled is what is scored

def test_sampled_distribution_equals_scored_logprobs(tiny):
    """generate() samples from exactly softmax(logits / T) with the placeholder tokens removed,
    and score() gives the sampled tokens the log-probs generate() sampled them with, whatever
    the batch and its padding (with and without CoT prompts)."""
    agent, cfg = tiny
    envs_ = [NumberLine() for _ in range(3)]
    images = [e.reset(seed=i)[0] for i, e in enumerate(envs_)]
    prompts = [vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(envs_[0], cot))
               for cot in (True, False)]
    T = 0.7
    for text in prompts:
        inputs = vlm_rl.encode_prompts(agent, images, text)
        torch.manual_seed(1)
        with torch.no_grad():
            out = agent.vlm.generate(**inputs, **vlm_rl.sampling_kwargs(agent, T, 12),
                                     output_scores=True, output_logits=True,
                                     return_dict_in_generate=True)
        scores = torch.stack(out.scores, 1)  # [B, M, V]
        logits = torch.stack(out.logits, 1)
        keep = torch.ones(scores.shape[-1], dtype=torch.bool)
        keep[agent.suppress] = False
        assert torch.isinf(scores[..., ~keep]).all()  # placeholder tokens are never sampled
        # softmax(logits / T) exactly
        assert torch.allclose(scores[..., keep], logits[..., keep] / T, atol=1e-5)
        answers = out.sequences[:, inputs["input_ids"].shape[1]:]
        gen_logp = torch.log_softmax(scores, -1).gather(-1, answers[..., None])[..., 0]
        batch = [vlm_rl.prompt_sample(inputs, j, answers[j]) for j in range(3)]
        with torch.no_grad():
            token_logp, _, valid, value = vlm_rl.score(agent, batch, T)
            # the same samples, padded differently (another batch): identical log-probs
            solo = vlm_rl.score(agent, batch[1:2], T)[0]
        assert torch.allclose(token_logp, gen_logp, atol=1e-4)
        assert torch.allclose(solo, token_logp[1:2], atol=1e-5)
        assert value.shape == (3,)


def test_entropy_bonus_gradient_is_finite_with_suppressed_tokens(tiny):
    """The entropy over the vocabulary (placeholder tokens at -inf) is positive, at most the
    uniform's, and its gradient finite: no 0 * -inf."""
    agent, _ = tiny
    agent.zero_grad()
    env = NumberLine()
    text = vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(env))
    inputs = vlm_rl.encode_prompts(agent, [env.reset(seed=0)[0]] * 2, text)
    batch = [vlm_rl.prompt_sample(inputs, j, torch.tensor([5, 6, 2])) for j in range(2)]
    _, entropy, valid, _ = vlm_rl.score(agent, batch, 0.5)
    uniform = torch.distributions.Categorical(logits=torch.zeros(len(agent.tokenizer)))
    assert (entropy > 0).all() and (entropy <= uniform.entropy() + 1e-4).all()
    entropy.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in agent.parameters() if p.grad is not None)
    agent.zero_grad()


@pytest.mark.slow  # building the EZPoints tiny model takes seconds
def test_update_scores_each_answer_under_the_picture_it_was_sampled_with():
    """The paper's code re-scored EZPoints/Points24 answers under the first prompt (an empty
    formula). Here each sample keeps the picture it was sampled under: its pixels are those of
    the formula it saw, they differ between steps, and scoring the same answer under the first
    picture would give another log-prob."""
    agent, cfg = new_agent("--num-envs", "1", "--max-new-tokens", "40", env_cls=EZPoints)
    agent.eval()
    runner = vlm_rl.Runner(agent, EZPoints, 1, 0, cfg)
    env = runner.envs[0]
    samples = []
    pictures = []
    for formula in ([], ["2"], ["2", "+"]):
        env.cards = [("2", "hearts"), ("K", "clubs")]
        env.formula = formula
        env.done = False
        runner.obs[0] = env.render()
        inputs = vlm_rl.encode_prompts(agent, [runner.obs[0]], runner.text)
        pictures.append(inputs["pixel_values"])
        samples.append(runner.step().samples[0])
    for sample, pixels in zip(samples, pictures):
        assert torch.equal(sample.extra["pixel_values"], pixels)
    assert not torch.equal(pictures[0], pictures[2])
    own = vlm_rl.score(agent, [samples[2]], 1.0).token_logp.sum()
    under_first = dataclasses.replace(samples[2], extra=samples[0].extra)
    first = vlm_rl.score(agent, [under_first], 1.0).token_logp.sum()
    assert abs(own - first) > 1e-3


# --- The training loop: PPO updates, the bandit it must learn, invalid answers, evaluation

def tiny_main(out, *flags):
    """vlm_rl.main in this process, on the CPU, writing to `out`: the run's summary."""
    return vlm_rl.main(["--device", "cpu", "--out-dir", str(out), *flags])


def answers_from(agent, *texts, end=True):
    """Token tensors for given answer texts (+ the end-of-turn token): a stand-in for sampling."""
    tail = agent.stop_ids[:1] if end else []
    return [torch.tensor(agent.tokenizer(t, add_special_tokens=False).input_ids + tail)
            for t in texts]


def metrics(path):
    """metrics.csv rows without their timing columns (the only ones that may differ between
    runs)."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")}
                for row in csv.DictReader(f)]


@pytest.mark.slow
def test_first_minibatch_has_ratio_one(tmp_path, monkeypatch):
    """The update's first minibatch re-scores answers under the weights that sampled them (in
    another batch, with other padding): exp(logp - old_logp) must be 1."""
    gaps = []
    real = vlm_rl.ppo_loss

    def spy(logp, old_logp, *args):
        gaps.append((logp - old_logp).abs().max().item())
        return real(logp, old_logp, *args)

    monkeypatch.setattr(vlm_rl, "ppo_loss", spy)
    tiny_main(tmp_path, "--sft-steps", "30", "--total-steps", "64", "--num-envs", "8",
              "--num-steps", "4", "--minibatch-size", "8", "--epochs", "2", "--eval-episodes", "0",
              "--max-new-tokens", "24")
    assert len(gaps) == 16  # 2 updates x 2 epochs x 4 minibatches
    assert gaps[0] < 1e-4 and gaps[8] < 1e-4, gaps  # the first of each update
    assert max(gaps) > 1e-3  # later minibatches do see changed weights


class Arrow(_Env):
    """A one-step bandit: the picture is an arrow; reward 1 for naming the way it points."""
    name = "arrow"
    action_names = ["left", "right"]
    image_size = 28
    default_noise = 0.5
    task = "The picture shows an arrow. Answer with the direction it points to."
    cot_fields = '"thoughts": "the direction"'

    def _deal(self):
        self.side = self.rng.randrange(2)

    def step(self, action):
        win = self._check(action) == self.side
        self.done = True
        return self.render(), float(win), True, False, self.info(win)

    def info(self, success):
        return {"success": success}

    def correct_action(self):
        return self.side

    def cot_values(self):
        return [("thoughts", self.action_names[self.side])]

    def render(self):
        img = Image.new("RGB", (28, 28), "white")
        tip, back = (2, 26) if self.side == 0 else (26, 2)
        ImageDraw.Draw(img).polygon([(tip, 14), (back, 3), (back, 25)], fill="black")
        return img


@pytest.mark.slow
def test_ppo_learns_a_bandit_from_chance(tmp_path, monkeypatch):
    """SFT on a demonstrator that answers at random teaches the format, not the answer (chance);
    PPO at the default learning rate must then learn to read the arrow."""
    monkeypatch.setitem(vlm_rl.ENVS, "arrow", Arrow)
    monkeypatch.setitem(vlm_rl.PRESETS, "arrow", {})
    s = tiny_main(tmp_path, "--env", "arrow", "--no-cot", "--sft-steps", "100",
                  "--total-steps", "1024", "--num-envs", "64", "--num-steps", "2",
                  "--minibatch-size", "32", "--eval-episodes", "400")
    # the defaults: no learning rate was given
    assert s["config"]["lr"] == 2e-5 and s["config"]["value_lr"] == 2e-5  # the paper: one lr
    assert 0.35 < s["sft_success"] < 0.65 and s["sft_invalid_rate"] < 0.05, s["eval"]["sft"]
    assert s["rl_success"] >= 0.9, s["eval"]["rl"]  # after 8 updates


def test_runner_flags_invalid_answers_and_applies_the_penalty(tiny, monkeypatch):
    """An answer with an illegal action, or cut off by the length limit, is invalid: a random
    action is played and the penalty subtracted; a valid one keeps where '"action"' starts."""
    agent, cfg = tiny
    cfg = dataclasses.replace(cfg, invalid_penalty=5.0)
    answers = answers_from(agent, '{"action": "+"}', '{"action": "jump"}')
    answers += answers_from(agent, '{"action": "+"}', end=False)
    # valid, illegal, cut off by the length limit
    monkeypatch.setattr(vlm_rl, "generate", lambda *args: answers)
    runner = vlm_rl.Runner(agent, NumberLine, 3, 0, cfg)
    step = runner.step()
    assert step.invalid == [False, True, True]
    assert step.rewards[0] in (-1.0, 0.0, 1.0) and all(-6 <= r <= -4 for r in step.rewards[1:])
    assert len(step.samples) == 3
    assert step.samples[0].action_start == 1  # '"action"' starts at character 1


def test_evaluate_plays_the_held_out_episodes_and_an_invalid_answer_loses(tiny, monkeypatch):
    """Evaluation leaves training's RNG alone, plays episodes EVAL_SEED + k (the same wins as
    hand-played ones), reports the standard error, and counts an invalid answer as a loss."""
    agent, cfg = tiny
    cfg = dataclasses.replace(cfg, num_envs=4, max_new_tokens=8)
    rng_before = torch.get_rng_state()
    vlm_rl.evaluate(agent, NumberLine, cfg, 3)  # real sampling: it must not touch training's RNG
    assert torch.equal(rng_before, torch.get_rng_state())
    plus = answers_from(agent, '{"action": "+"}')
    monkeypatch.setattr(vlm_rl, "generate",
                        lambda agent, inputs, *a: plus * len(inputs["input_ids"]))
    result = vlm_rl.evaluate(agent, NumberLine, cfg, 10)
    wins = 0  # the same policy, by hand, on episodes EVAL_SEED + 0..9
    for k in range(10):
        env = NumberLine()
        env.reset(seed=vlm_rl.EVAL_SEED + k)
        done = False
        while not done:
            _, _, term, trunc, info = env.step(1)
            done = term or trunc
        wins += info["success"]
    assert 0 < wins < 10 and result["success"] == wins / 10 and result["episodes"] == 10
    assert result["invalid_rate"] == 0
    assert result["se"] == pytest.approx((wins / 10 * (1 - wins / 10) / 10) ** 0.5)
    nonsense = answers_from(agent, "no idea")
    monkeypatch.setattr(vlm_rl, "generate",
                        lambda agent, inputs, *a: nonsense * len(inputs["input_ids"]))
    result = vlm_rl.evaluate(agent, NumberLine, cfg, 10)
    # random play would have won ~60%
    assert result["success"] == 0 and result["invalid_rate"] == 1


def test_degenerate_sizes_run(tmp_path):
    """One env, one step per update (a single advantage: nothing to normalise), no evaluation."""
    s = tiny_main(tmp_path, "--num-envs", "1", "--num-steps", "1", "--total-steps", "2",
                  "--sft-steps", "0", "--eval-episodes", "0", "--max-new-tokens", "8")
    rows = metrics(tmp_path / "metrics.csv")
    assert len(rows) == 2 and all(math.isfinite(float(r["policy_loss"])) for r in rows)
    assert s["rl_success"] is None and s["eval"] == {"sft": None, "rl": None}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLM_RL_SLOW"),
                    reason="5-15 minutes of CPU: VLM_RL_SLOW=1 runs it")
@pytest.mark.parametrize("env_cls", [EZPoints, Points24])
def test_sft_reads_the_cards_of_held_out_deals(env_cls):
    """The pictures are legible to the tiny model: after the default SFT (EZPoints 600 steps,
    Points24 1000), its greedy answers on held-out deals name every card's value (a model that
    cannot see them gets about 1 in 45 EZPoints pairs right by guessing). Shorter SFTs do not get
    there: after 400 steps of 16 the model still named the same EZPoints pair for every deal;
    with EZPoints' card layout, Points24's SFT named only the first of its four cards."""
    agent, cfg = new_agent(env_cls=env_cls)
    vlm_rl.sft(agent, env_cls, cfg)
    agent.eval()
    deals = [env_cls() for _ in range(40)]
    images = [d.reset(seed=vlm_rl.EVAL_SEED + k)[0] for k, d in enumerate(deals)]
    text = vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(deals[0]))
    inputs = vlm_rl.encode_prompts(agent, images, text)
    answers = agent.tokenizer.batch_decode(vlm_rl.generate(agent, inputs, 0.0, 48),
                                           skip_special_tokens=True)
    read = [re.search(r'"cards": "([^"]*)"', a) for a in answers]
    right = sum(m is not None and m.group(1) == " ".join(map(str, d.values))
                for m, d in zip(read, deals))
    assert right >= 32, answers[:5]  # >= 80% of 40


# --- CLI and config: one-line errors, a run's outputs, reproducibility

TINY = ["--sft-steps", "30", "--total-steps", "64", "--num-envs", "8", "--num-steps", "4",
        "--epochs", "2", "--minibatch-size", "16", "--eval-episodes", "8", "--max-new-tokens",
        "40", "--device", "cpu"]


def run_cli(*args, timeout=600):
    """The real command, `python vlm_rl.py ARGS`, in another process (offline)."""
    return subprocess.run([sys.executable, os.path.join(HERE, "vlm_rl.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def exit_message(excinfo):
    """The message of a SystemExit raised by sys.exit("vlm_rl.py: error: ..."), checked to be
    the one-line error that Python prints to stderr as it exits with status 1."""
    message = excinfo.value.code
    assert isinstance(message, str) and message.startswith("vlm_rl.py: error: "), message
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("args, words", [
    (["--env", "chess"], "invalid choice: 'chess'"),  # argparse's own error, no usage dump
    # from transformers, after seconds of imports
    pytest.param(["--model", "does/not-exist"], "cannot load model 'does/not-exist'",
                 marks=pytest.mark.slow),
])
def test_the_command_prints_a_one_line_error_without_traceback(args, words, tmp_path):
    """What a user of the real command sees for bad input: exit status 1, one line on stderr,
    no traceback (the in-process test below covers every message)."""
    r = run_cli(*args, "--out-dir", str(tmp_path / "x"), timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--env", "chess"], "invalid choice: 'chess'"),
    (["--thought-coef", "1.5"], "--thought-coef"),
    (["--thought-coef", "-0.1"], "--thought-coef"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--lr", "2"], "learning rates"),
    (["--num-envs", "0"], "--num-envs"),
    (["--num-envs", "three"], "--num-envs"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--resume", "/nonexistent-dir"], "no checkpoint.safetensors"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--num-envs", "4", "--num-steps", "2", "--minibatch-size", "16"],
     "--minibatch-size 16 is larger than"),
    (["--num-envs", "4", "--num-steps", "2", "--total-steps", "4"], "is below one PPO update"),
    (["--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    (["--eval-on", "train"], "--eval-on: invalid choice: 'train'"),
    (["--value-lr", "0"], "learning rates"),
    (["--out-dir", "/proc/version/x"], "cannot write to --out-dir"),
])
def test_bad_input_is_a_one_line_error(args, words, tmp_path):
    """Each bad flag stops vlm_rl.main before any work with a one-line error naming the
    problem."""
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "--out-dir" not in args:
        args = [*args, "--out-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as excinfo:
        vlm_rl.main(args)
    assert words in exit_message(excinfo)


def check_run_outputs(out, env):
    """The files of a TINY run in `out`: (its metrics without timings, its summary)."""
    for f in ("metrics.csv", "summary.json", "model/config.json", "model/value_head.safetensors",
              "model/tokenizer.json"):
        assert (out / f).exists(), f
    rows = metrics(out / "metrics.csv")
    assert len(rows) == 2 and [int(r["env_steps"]) for r in rows] == [32, 64]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    for key in ("sft_success", "rl_success", "eval_episodes", "invalid_rate", "wall_seconds",
                "config"):
        assert key in summary
    assert 0 <= summary["rl_success"] <= 1 and summary["config"]["env"] == env
    assert set(summary["seconds"]) == {"sft", "eval_sft", "rl_gen", "rl_score", "rl_ppo",
                                       "eval_rl"}
    # sampled only: no --eval-greedy
    assert [summary["eval"][phase]["greedy"] for phase in ("sft", "rl")] == [None, None]
    return rows, summary


def without_run_details(summary):
    """A summary without what differs between two runs of one config: times, output folder."""
    config = {k: v for k, v in summary["config"].items() if k != "out_dir"}
    times = ("wall_seconds", "seconds")
    return {**{k: v for k, v in summary.items() if k not in times}, "config": config}


@pytest.mark.slow
def test_the_command_end_to_end_is_reproducible_and_its_model_loads_back(tmp_path, monkeypatch):
    """The real command writes every output; the same flags in another process (this one) give
    the same numbers (the seconds columns aside); scripts/curve.py draws the run; the saved
    agent loads back (--model <dir>, no SFT, no RL) and evaluates to the run's final success."""
    first = tmp_path / "command"
    r = run_cli("--env", "numberline", "--out-dir", str(first), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    rows, summary = check_run_outputs(first, "numberline")
    second = tmp_path / "in-process"
    tiny_main(second, "--env", "numberline", *TINY)
    rows2, summary2 = check_run_outputs(second, "numberline")
    assert rows == rows2
    assert without_run_details(summary) == without_run_details(summary2)
    # the learning curve, drawn from metrics.csv and summary.json
    monkeypatch.setattr(sys, "argv", ["curve.py", str(first)])
    curve.main()
    assert Image.open(first / "curve.png").size == (640, 400)
    # --sft-steps 0 --total-steps 0 --model <dir>: an evaluation of the saved agent
    evaluation = tiny_main(tmp_path / "eval", "--env", "numberline", "--model",
                           str(first / "model"), "--sft-steps", "0", "--total-steps", "0",
                           "--eval-episodes", "8", "--num-envs", "8", "--max-new-tokens", "40")
    assert evaluation["sft_success"] == summary["rl_success"]


@pytest.mark.slow
@pytest.mark.parametrize("env", ["blackjack", "ezpoints", "points24"])
def test_a_tiny_run_of_each_game_writes_every_output(env, tmp_path):
    """SFT, evaluation, PPO, evaluation on each game: metrics.csv, summary.json and the model."""
    tiny_main(tmp_path, "--env", env, *TINY)
    check_run_outputs(tmp_path, env)


# --- Fixes found by review (issue 23): each test fails on the code before the fix

def test_an_answer_without_an_action_has_a_gradient_at_lambda_zero(tiny):
    """No parseable action: the whole answer counts as the action, so at lambda = 0 its log-prob
    is the sum over all its tokens, and the invalid-answer penalty can push it down."""
    agent, _ = tiny
    for text in ["no idea", '{"thoughts": "3 > 1", "act', '{"action": 5}']:
        parsed = parse_action(text, ["-", "+"])
        assert parsed.action is None and parsed.action_start == 0
        ids = torch.tensor(agent.tokenizer(text, add_special_tokens=False).input_ids)
        mask = action_token_mask(agent.tokenizer, [ids], [parsed.action_start])
        token_logp = torch.randn(1, len(ids), requires_grad=True)
        logp = answer_logprob(token_logp, mask, torch.ones_like(mask), 0.0)
        logp.backward()
        assert mask.all()
        assert torch.allclose(logp, token_logp.sum())
        assert (token_logp.grad == 1).all()


def resume_dir(tmp_path, **config):
    """A run directory whose checkpoint holds `config` (over the defaults of a built-in run)."""
    cfg, _ = vlm_rl.parse_config(["--device", "cpu", "--out-dir", str(tmp_path)])
    state = {"config": {**dataclasses.asdict(cfg), **config}, "update": 1, "rows": []}
    metadata = {"state": json.dumps(state)}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoint.safetensors"), metadata=metadata)
    return str(tmp_path)


def test_resume_refuses_another_seed_of_the_built_in_model_or_another_lora_alpha(tmp_path):
    run = resume_dir(tmp_path, seed=1, lora_alpha=16.0)
    for flag, value in [("--seed", "2"), ("--lora-alpha", "32")]:
        with pytest.raises(SystemExit) as e:
            vlm_rl.parse_config(["--resume", run, flag, value])
        assert f"that run has {flag}" in str(e.value.code)
    # a hub model's weights do not depend on the seed: another seed is fine
    run = resume_dir(tmp_path, model="some/model")
    cfg, _ = vlm_rl.parse_config(["--resume", run, "--seed", "2"])
    assert cfg.seed == 2


def test_validation_deals_are_not_the_test_deals(tiny, monkeypatch):
    """--eval-on valid plays episode k from VALID_SEED + k, test from EVAL_SEED + k."""
    agent, cfg = tiny
    plus = answers_from(agent, '{"action": "+"}')
    monkeypatch.setattr(vlm_rl, "generate",
                        lambda agent, inputs, *a: plus * len(inputs["input_ids"]))
    for split, first_seed in [("test", vlm_rl.EVAL_SEED), ("valid", vlm_rl.VALID_SEED)]:
        seen = {}

        def watch(episode, picture, step, j):
            seen.setdefault(episode, picture.tobytes())

        run_cfg = dataclasses.replace(cfg, num_envs=4, max_new_tokens=8, eval_on=split)
        vlm_rl.evaluate(agent, NumberLine, run_cfg, 6, watch=watch)
        for k in range(6):
            assert seen[k] == NumberLine().reset(seed=first_seed + k)[0].tobytes()
    with pytest.raises(SystemExit):
        vlm_rl.parse_config(["--eval-on", "train"])


def test_explained_variance_against_numpy():
    rng = np.random.default_rng(0)
    returns = rng.normal(size=50)
    values = returns + rng.normal(scale=0.5, size=50)
    expected = 1 - np.var(returns - values) / np.var(returns)
    got = vlm_rl.explained_variance(torch.tensor(values), torch.tensor(returns))
    assert got == pytest.approx(expected, abs=1e-9)
    assert vlm_rl.explained_variance(torch.tensor(returns), torch.tensor(returns)) == 1
    assert math.isnan(vlm_rl.explained_variance(torch.zeros(3), torch.ones(3)))


def test_score_passes_the_positions_generate_uses(tiny, monkeypatch):
    """Prompts of different lengths: each row's positions count from its first real token, as in
    generate() (a model with absolute position embeddings would need it), and scoring a sample
    in a batch gives what scoring it alone gives."""
    agent, _ = tiny
    env = NumberLine()
    images = [env.reset(seed=i)[0] for i in range(2)]
    texts = [vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(env, cot))
             for cot in (True, False)]
    inputs = vlm_rl.encode_prompts(agent, images, texts)
    answers = answers_from(agent, '{"action": "+"}', '{"thoughts": "x", "action": "-"}')
    batch = [vlm_rl.prompt_sample(inputs, j, answers[j]) for j in range(2)]
    seen, real = [], agent.vlm.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("position_ids"))
        return real(*args, **kwargs)
    monkeypatch.setattr(agent.vlm, "forward", spy)
    with torch.no_grad():
        together = vlm_rl.score(agent, batch, 1.0).token_logp
        alone = [vlm_rl.score(agent, [s], 1.0).token_logp for s in batch]
    positions, mask = seen[0], vlm_rl.collate(agent, batch, "cpu")[0]["attention_mask"]
    assert positions is not None
    for row, row_mask in zip(positions, mask):
        assert row[row_mask.bool()].tolist() == list(range(int(row_mask.sum())))
    for b, solo in enumerate(alone):
        assert torch.allclose(together[b, :solo.shape[1]], solo[0], atol=1e-5)


# --- Checkpoints and resume

class Interrupted(Exception):
    """Stands for a kill at a chosen point of a run."""


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    """LoRA + gradient checkpointing, a checkpoint after every update. A run stopped while it
    writes the checkpoint of PPO update 3 (so metrics.csv already holds a row the last checkpoint
    does not, and the rollout has moved the games and random streams on) and continued with
    --resume equals an uninterrupted run: metrics.csv (no row twice or missing, same numbers),
    the summary and the saved model. The checkpoint holds no frozen base weight; a resume with
    another --env is refused."""
    args = ["--env", "numberline", "--sft-steps", "10", "--total-steps", "160", "--num-envs", "8",
            "--num-steps", "4", "--epochs", "1", "--minibatch-size", "16", "--eval-episodes", "4",
            "--max-new-tokens", "40", "--device", "cpu", "--save-every", "1", "--lora-rank", "4",
            "--gradient-checkpointing"]
    full = tmp_path / "full"
    vlm_rl.main([*args, "--out-dir", str(full)])

    real_save = vlm_rl.save_checkpoint
    saves = []

    def save_until_update_3(*save_args):
        saves.append(len(saves))  # save 0: after SFT; save k: after PPO update k
        if len(saves) == 4:
            raise Interrupted
        real_save(*save_args)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(vlm_rl, "save_checkpoint", save_until_update_3)
        with pytest.raises(Interrupted):
            vlm_rl.main([*args, "--out-dir", str(stopped)])
    with safe_open(str(stopped / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["update"] == 2
    assert len(metrics(stopped / "metrics.csv")) == 3, "a row beyond the checkpoint"
    capsys.readouterr()

    vlm_rl.main(["--resume", str(stopped)])
    assert f"resuming {stopped} after PPO update 2" in capsys.readouterr().out
    # no row twice or missing, the same numbers
    assert metrics(stopped / "metrics.csv") == metrics(full / "metrics.csv")
    summaries = []
    for run in (stopped, full):
        with open(run / "summary.json") as f:
            summary = json.load(f)
        assert set(summary["seconds"]) == {"sft", "eval_sft", "rl_gen", "rl_score", "rl_ppo",
                                           "eval_rl"}
        summaries.append({k: v for k, v in summary.items()
                          if k not in ("wall_seconds", "seconds", "config")})
    assert summaries[0] == summaries[1]
    for name in ("model.safetensors", "value_head.safetensors"):
        resumed = load_file(str(stopped / "model" / name))
        uninterrupted = load_file(str(full / "model" / name))
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), name
    with safe_open(str(stopped / "checkpoint.safetensors"), "pt") as f:
        params = [k for k in f.keys() if k.startswith("param.")]
    assert params
    assert all(k.endswith((".A", ".B", "lm_head.weight")) or k.startswith("param.value_head.")
               for k in params)
    with pytest.raises(SystemExit) as excinfo:
        vlm_rl.main(["--resume", str(stopped), "--env", "blackjack"])
    assert "that run has --env 'numberline', not 'blackjack'" in exit_message(excinfo)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    """NaN log-probs from PPO update 3 on: the run stops with a one-line error before stepping
    the optimizer, and the checkpoint of update 2 (finite weights, 2 rows) is kept."""
    real_score = vlm_rl.score
    calls = {"n": 0}

    def poisoned(agent, batch, temperature):  # NaN log-probs from the 3rd PPO update's epochs on
        token_logp, entropy, valid, value = real_score(agent, batch, temperature)
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] > 2:
            token_logp = token_logp * float("nan")
        return vlm_rl.Scored(token_logp, entropy, valid, value)

    monkeypatch.setattr(vlm_rl, "score", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as excinfo:
        tiny_main(out, "--env", "numberline", "--sft-steps", "0", "--total-steps", "160",
                  "--num-envs", "8", "--num-steps", "4", "--epochs", "1", "--minibatch-size", "32",
                  "--eval-episodes", "2", "--max-new-tokens", "40")
    assert "non-finite loss in PPO update 3" in exit_message(excinfo)
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["state"])
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys()
                   if k.startswith("param."))
    assert meta["update"] == 2 and len(meta["rows"]) == 2


class Payload:
    """Unpickling this object creates a file: what a crafted checkpoint.pt could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """--resume never unpickles: a checkpoint.pt is refused (its payload never runs), and a
    checkpoint.safetensors that is not vlm_rl's is a one-line error."""
    run = tmp_path / "run"
    marker = tmp_path / "pwned"
    run.mkdir()
    torch.save({"config": Payload(str(marker))}, run / "checkpoint.pt")
    with pytest.raises(SystemExit) as excinfo:
        vlm_rl.main(["--resume", str(run)])
    assert "never loaded" in exit_message(excinfo)
    (run / "checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(SystemExit) as excinfo:
        vlm_rl.main(["--resume", str(run)])
    assert "not a vlm_rl checkpoint" in exit_message(excinfo)
    assert not marker.exists()


# --- Precision and LoRA

def one_ppo_step(agent, lr=1e-2):
    """A PPO minibatch step on a few sampled answers, through the real functions."""
    env = NumberLine()
    images = [env.reset(seed=i)[0] for i in range(4)]
    text = vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(env))
    inputs = vlm_rl.encode_prompts(agent, images, text)
    answers = vlm_rl.generate(agent, inputs, 1.0, 16)
    batch = [vlm_rl.prompt_sample(inputs, j, answers[j]) for j in range(4)]
    opt = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=lr)
    token_logp, _, valid, value = vlm_rl.score(agent, batch, 1.0)
    logp = answer_logprob(token_logp, torch.zeros_like(valid), valid, 0.5)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss = ppo_loss(logp, logp.detach() - 0.01, advantages, value, torch.ones(4), 0.1, 0.5)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return batch


def test_lora_trains_only_adapters_and_value_head_and_merges_on_save(tmp_path):
    """--lora-rank 4: adapters on every linear layer but lm_head; a step changes only adapters,
    the tiny model's lm_head and the value head; merged and saved, the model reloads with
    save_pretrained's files alone and scores as the unmerged one did."""
    agent, _ = new_agent("--lora-rank", "4")
    n_lora = sum(isinstance(m, vlm_rl.LoRALinear) for m in agent.modules())
    # Llama: q k v o gate up down; CLIP: q k v out fc1 fc2; projector: 2
    assert n_lora == 2 * 7 + 2 * 6 + 2
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    batch = one_ppo_step(agent)
    changed = {k for k, v in agent.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    assert all(k.endswith((".A", ".B", "lm_head.weight")) or k.startswith("value_head.")
               for k in changed)
    assert any(k.endswith(".B") for k in changed)
    assert any(k.startswith("value_head.") for k in changed)
    with torch.no_grad():
        ref = vlm_rl.score(agent, batch, 1.0)[0]
        vlm_rl.merge_lora(agent.vlm)
        assert not any(isinstance(m, vlm_rl.LoRALinear) for m in agent.modules())
        agent.vlm.save_pretrained(tmp_path / "m")
        agent.processor.save_pretrained(tmp_path / "m")
        reloaded, _ = new_agent("--model", str(tmp_path / "m"))
        got = vlm_rl.score(reloaded, batch, 1.0)[0]
    assert torch.allclose(got, ref, atol=1e-5)


def test_full_finetune_changes_base_weights_and_gradient_checkpointing_runs():
    """Without LoRA a step changes the language model's own weights (and the value head), with
    gradient checkpointing on."""
    agent, _ = new_agent("--gradient-checkpointing")
    agent.train()
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    one_ppo_step(agent)
    changed = {k for k, v in agent.state_dict().items() if not torch.equal(v, before[k])}
    assert any("language_model" in k for k in changed)
    assert any("value_head" in k for k in changed)


def test_bf16_trains_float32_masters_so_small_updates_survive():
    """--dtype bfloat16 computes in bf16 but trains float32 masters: a step at lr 1e-5 (below
    bf16's resolution) still changes >= 99% of the weights."""
    agent, _ = new_agent("--dtype", "bfloat16")
    assert agent.dtype == torch.bfloat16
    # full fine-tuning: all trained
    assert all(p.dtype == torch.float32 for p in agent.parameters())
    before = {k: p.detach().clone() for k, p in agent.named_parameters()}
    one_ppo_step(agent, lr=1e-5)
    changed = sum((p != before[k]).sum().item() for k, p in agent.named_parameters())
    assert changed / sum(p.numel() for p in agent.parameters()) >= 0.99


def test_bf16_lora_merges_in_float32_and_matches_the_unmerged_model():
    """bf16 + LoRA: adapters in float32, the frozen base in bf16; merged in float32 and cast
    once, the model scores within bf16's error of the unmerged one."""
    agent, _ = new_agent("--dtype", "bfloat16", "--lora-rank", "4")
    trained = [p for p in agent.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in agent.vlm.parameters() if not p.requires_grad)
    for _ in range(3):
        batch = one_ppo_step(agent, lr=1e-3)
    with torch.no_grad():
        ref = vlm_rl.score(agent, batch, 1.0)
        vlm_rl.merge_lora(agent.vlm)
        vlm_rl.cast(agent.vlm.parameters(), agent.dtype)
        got = vlm_rl.score(agent, batch, 1.0)
    gap = (got.token_logp - ref.token_logp)[ref.valid].abs()
    assert gap.max() < 0.1 and gap.mean() < 0.02, (gap.max(), gap.mean())


# --- torchrun: data parallelism on two CPU processes

# vlm_rl.main under torchrun, recording each rank's trained tensors and, at every optimizer step,
# its gradients' sum and sum of |.| before averaging and their sum after
TORCHRUN_WRAPPER = """import json
import os
import sys

sys.path.insert(0, {here!r})
import vlm_rl
from safetensors.torch import save_file

out = os.environ["OUT"]
rank = os.environ["RANK"]
real_train = vlm_rl.train
real_average = vlm_rl.average_gradients
grad_sums = []


def sums(params):
    grads = [p.grad.double() for p in params if p.grad is not None]
    return sum(g.sum().item() for g in grads), sum(g.abs().sum().item() for g in grads)


def average(params):
    before, size = sums(params)
    real_average(params)
    grad_sums.append((before, size, sums(params)[0]))


def train(agent, opt, *args):
    real_train(agent, opt, *args)
    trained = {{k: p.detach().contiguous() for k, p in agent.named_parameters()
               if p.requires_grad}}
    save_file(trained, os.path.join(out, "rank%s.safetensors" % rank))


vlm_rl.average_gradients = average
vlm_rl.train = train
vlm_rl.main(sys.argv[1:])
with open(os.path.join(out, "grads%s.json" % rank), "w") as f:
    json.dump(grad_sums, f)
"""


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_average_gradients_and_write_once(tmp_path):
    """2 gloo processes, two PPO updates: the ranks' gradients differ before averaging (they play
    different episodes) and equal their mean after, so the trained tensors are identical on both
    ranks; one metrics.csv row per update counting both ranks' env steps; one summary.json;
    --resume refuses another number of processes."""
    wrapper = tmp_path / "run.py"
    wrapper.write_text(TORCHRUN_WRAPPER.format(here=HERE))
    out = tmp_path / "run"
    out.mkdir()
    sft_steps = 5
    args = ["--env", "numberline", "--device", "cpu", "--sft-steps", str(sft_steps),
            "--sft-batch", "4", "--total-steps", "64", "--num-envs", "4", "--num-steps", "4",
            "--eval-episodes", "6", "--max-new-tokens", "32", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(wrapper), *args],
                       capture_output=True, text=True, timeout=600, cwd=HERE, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(out / "rank0.safetensors"))
    b = load_file(str(out / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sums = []
    for rank in (0, 1):
        with open(out / f"grads{rank}.json") as f:
            sums.append(json.load(f))
    assert len(sums[0]) == len(sums[1]) > sft_steps
    for step, ((before0, size0, after0), (before1, size1, after1)) in enumerate(zip(*sums)):
        if step >= sft_steps:  # the PPO steps: each rank's own episodes, its own gradients
            assert before0 != before1, step
        assert after0 == after1, step
        assert abs(after0 - (before0 + before1) / 2) <= 1e-5 * (size0 + size1), step
    rows = metrics(out / "metrics.csv")
    assert [int(r["env_steps"]) for r in rows] == [32, 64]  # 2 ranks x 4 envs x 4 steps an update
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["eval"]["rl"]["sampled"]["episodes"] == 6 and summary["rl_success"] is not None
    with pytest.raises(SystemExit) as excinfo:
        vlm_rl.main(["--resume", str(out)])
    assert "that run had 2 process(es), not 1" in exit_message(excinfo)


# --- Other VLM architectures through the same code path: tiny random-weight models built
# offline (a config, a BPE tokenizer trained on the game's text, the architecture's PIL image
# processor)

@pytest.mark.parametrize("model_type", ["mllama", "florence2"])
def test_unsupported_families_are_refused_at_load_with_the_reason(model_type, tmp_path):
    """Families the answer log-prob cannot score are refused at load, with the reason."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(SystemExit) as excinfo:
        vlm_rl.main(["--model", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert f"{model_type} models are not supported" in exit_message(excinfo)


# PaliGemma's processor builds its (unused) labels with np.array(..., copy=False): numpy 2 warns
ARCH_WARNINGS = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def make_tokenizer(specials, **named):
    """Byte-level BPE on the game's prompts; `named` special tokens become tokenizer attributes
    (e.g. image_token="<image>"), which is where processors look for them."""
    corpus = [vlm_rl.build_prompt(e(), cot) for e in (NumberLine, Blackjack)
              for cot in (True, False)] * 4
    bpe = vlm_rl.train_bpe(corpus, 320, ["<pad>", "<s>", "</s>", *specials])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens=named)


def text_ids(tok):
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)


LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def llava_next():
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
    tok = make_tokenizer(["<image>"], image_token="<image>")
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    image_proc = LlavaNextImageProcessorPil(size={"shortest_edge": 28},
                                            crop_size={"height": 28, "width": 28},
                                            image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION, image_size=28, patch_size=14),
                             text_config=LlamaConfig(**LLAMA, **text_ids(tok)),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-1, image_grid_pinpoints=pinpoints)
    return LlavaNextForConditionalGeneration(config), processor


QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")


def image_only(processor_cls):
    """`processor_cls` without its video processor, which needs torchvision (even to be built);
    images do not use it."""
    class ImageOnly(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template,
                             **kwargs)
    return ImageOnly


def qwen_vl(version):
    """Qwen2-VL / Qwen2.5-VL: one model class each, the same processor and image processor."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)
    name = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL"}[version]
    Config, Model, Processor = (getattr(transformers, name + s) for s in
                                ("Config", "ForConditionalGeneration", "Processor"))
    specials = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                "<|im_start|>", "<|im_end|>"]
    tok = make_tokenizer(specials, image_token="<|image_pad|>", video_token="<|video_pad|>")
    image_proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14,
                                          merge_size=2, temporal_patch_size=2)
    processor = image_only(Processor)(image_processor=image_proc, tokenizer=tok,
                                      chat_template=QWEN_TEMPLATE)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in zip(names, specials)}
    vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    if version == "2.5":
        vision.update(intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[0])
    rope = {"rope_type": "default", "mrope_section": [4, 6, 6]}
    text = dict(LLAMA, num_key_value_heads=2, rope_scaling=rope, **text_ids(tok))
    config = Config(vision_config=vision, text_config=text, **ids)
    return Model(config), processor


IDEFICS_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:"
                    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                    "<end_of_utterance>\n{% endfor %}Assistant:")


def idefics3(smol=False):
    """Idefics3 / SmolVLM (the same design; SmolVLM's processor also does video)."""
    import transformers
    from transformers import LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil)
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    if smol:
        pytest.importorskip("num2words")  # SmolVLMProcessor wants it
    name = "SmolVLM" if smol else "Idefics3"
    Config, Model, Processor = (getattr(transformers, name + s) for s in
                                ("Config", "ForConditionalGeneration", "Processor"))
    specials = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    tok = make_tokenizer(specials)
    image_proc_cls = SmolVLMImageProcessorPil if smol else Idefics3ImageProcessorPil
    image_proc = image_proc_cls(do_image_splitting=False, size={"longest_edge": 56},
                                max_image_size={"longest_edge": 56})
    make = image_only(Processor) if smol else Processor
    # no chat template for SmolVLM: its apply_chat_template reads the (absent) video
    # processor's settings
    processor = make(image_processor=image_proc, tokenizer=tok, image_seq_len=4,
                     chat_template=None if smol else IDEFICS_TEMPLATE)
    config = Config(vision_config=dict(VISION, image_size=56, patch_size=14),
                    text_config=LlamaConfig(**LLAMA, **text_ids(tok)), scale_factor=2,
                    image_token_id=tok.convert_tokens_to_ids("<image>"))
    return Model(config), processor


def paligemma():
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    tok = make_tokenizer(["<image>"], image_token="<image>")
    image_proc = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    image_proc.image_seq_length = 4  # (28 / 14) ** 2 patches
    # it adds its <loc>/<seg> tokens
    processor = PaliGemmaProcessor(image_processor=image_proc, tokenizer=tok)
    vision = dict(VISION, image_size=28, patch_size=14, projection_dim=64,
                  model_type="siglip_vision_model")
    text = GemmaConfig(**LLAMA, head_dim=32, num_key_value_heads=1, **text_ids(tok))
    config = PaliGemmaConfig(vision_config=vision, text_config=text,
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             projection_dim=64, hidden_size=64)
    return PaliGemmaForConditionalGeneration(config), processor


def gemma3():
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    specials = ["<image_soft_token>", "<start_of_image>", "<end_of_image>"]
    tok = make_tokenizer(specials, image_token=specials[0], boi_token=specials[1],
                         eoi_token=specials[2])
    image_proc = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    processor = Gemma3Processor(image_processor=image_proc, tokenizer=tok, image_seq_length=4)
    vision = dict(VISION, image_size=56, patch_size=14, model_type="siglip_vision_model")
    text = Gemma3TextConfig(**LLAMA, head_dim=32, num_key_value_heads=1, query_pre_attn_scalar=32,
                            sliding_window=16, **text_ids(tok))
    image, boi, eoi = (tok.convert_tokens_to_ids(t) for t in specials)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                          image_token_index=image, boi_token_index=boi, eoi_token_index=eoi)
    return Gemma3ForConditionalGeneration(config), processor


ARCHS = {"llava_next": llava_next,
         "qwen2_vl": functools.partial(qwen_vl, "2"),
         "qwen2_5_vl": functools.partial(qwen_vl, "2.5"),
         "idefics3": idefics3,
         "smolvlm": functools.partial(idefics3, smol=True),
         "paligemma": paligemma,
         "gemma3": gemma3}


def arch_agent(arch):
    torch.manual_seed(0)
    vlm, processor = ARCHS[arch]()
    vlm.generation_config = GenerationConfig()  # as load_agent does
    return vlm_rl.Agent(vlm, processor).eval()


def prompts(agent):
    """Three prompts of different lengths, each with one image (all 56 px, as in one game: the
    number of image tiles / patches per prompt must agree within a batch)."""
    envs_ = [NumberLine(), NumberLine(), Blackjack()]
    images = [e.reset(seed=i)[0].resize((56, 56)) for i, e in enumerate(envs_)]
    texts = [vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(e, cot))
             for e, cot in zip(envs_, (True, False, True))]
    return vlm_rl.encode_prompts(agent, images, texts)


@ARCH_WARNINGS
@pytest.mark.parametrize("arch", ARCHS)
def test_scored_logprobs_equal_generate_scores(arch):
    """On each architecture, score() gives each sampled token (up to the first end of turn) the
    log-prob generate() sampled it with, under left padding and without any."""
    agent = arch_agent(arch)
    T = 0.7
    inputs = prompts(agent)
    lengths = inputs["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == 3, lengths  # left padding really happens
    torch.manual_seed(1)
    with torch.no_grad():
        out = agent.vlm.generate(**inputs, **vlm_rl.sampling_kwargs(agent, T, 12),
                                 output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, 1)  # [B, M, V]
    sampled = out.sequences[:, inputs["input_ids"].shape[1]:]
    gen_logp = torch.log_softmax(scores, -1).gather(-1, sampled[..., None])[..., 0]
    # each answer ends at its first end-of-turn token
    ends = torch.isin(sampled, torch.tensor(agent.stop_ids))
    answers = [row[:e.nonzero()[0, 0] + 1] if e.any() else row for row, e in zip(sampled, ends)]
    batch = [vlm_rl.prompt_sample(inputs, j, answers[j]) for j in range(3)]
    with torch.no_grad():
        token_logp, _, valid, value = vlm_rl.score(agent, batch, T)
        solo = vlm_rl.score(agent, batch[2:], T)[0]  # the longest prompt, alone: no padding at all
    assert valid.sum(-1).tolist() == [len(a) for a in answers]
    torch.testing.assert_close(token_logp[valid], gen_logp[:, :valid.shape[1]][valid], atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(solo[valid[2:]], token_logp[2:][valid[2:]], atol=1e-4, rtol=0)
    assert value.shape == (3,) and torch.isfinite(value).all()


@ARCH_WARNINGS
@pytest.mark.parametrize("arch", ARCHS)
def test_ppo_step_changes_language_model_and_value_head(arch):
    """On each architecture, a PPO step back-propagates into the language model and the value
    head."""
    agent = arch_agent(arch)
    inputs = prompts(agent)
    torch.manual_seed(1)
    answers = vlm_rl.generate(agent, inputs, 1.0, 8)
    batch = [vlm_rl.prompt_sample(inputs, j, answers[j]) for j in range(3)]
    before = {k: v.clone() for k, v in agent.named_parameters()}
    opt = torch.optim.AdamW(agent.parameters(), lr=1e-2)
    agent.train()
    token_logp, _, valid, value = vlm_rl.score(agent, batch, 1.0)
    logp = vlm_rl.answer_logprob(token_logp, torch.zeros_like(valid), valid, 0.5)
    advantages = torch.tensor([1.0, -1.0, 0.5])
    loss = vlm_rl.ppo_loss(logp, logp.detach() - 0.01, advantages, value, torch.ones(3), 0.1,
                           0.5)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {id(p) for k, p in agent.named_parameters() if not torch.equal(p, before[k])}
    decoder = {id(p) for p in agent.vlm.get_decoder().parameters()}
    assert changed & decoder, "no language-model weight changed"
    assert changed & {id(p) for p in agent.value_head.parameters()}, "the value head did not change"


# --- scripts/reproduce.py: aggregation and tables from hand-made summaries

def test_mean_se_against_hand_numbers():
    """Mean and standard error across seeds, a missing seed left out; the table cell format."""
    m, se = reproduce.mean_se([0.8, 0.9, 1.0])  # sample std 0.1, / sqrt(3)
    assert math.isclose(m, 0.9) and math.isclose(se, 0.1 / math.sqrt(3))
    # a missing value is left out: std 0.3536, / sqrt(2)
    m, se = reproduce.mean_se([0.25, None, 0.75])
    assert math.isclose(m, 0.5) and math.isclose(se, 0.25)
    assert reproduce.mean_se([0.4]) == (0.4, None) and reproduce.mean_se([None]) == (None, None)
    assert reproduce.cell([0.8, 0.9, 1.0]) == "90.0 ± 5.8 [80.0, 90.0, 100.0]"
    assert reproduce.cell([0.5, None]) == "50.0 [50.0, –]" and reproduce.cell([None, None]) == "–"
    assert reproduce.cell([100.0, 120.0], 1, 0) == "110 ± 10 [100, 120]"


def eval_mode(success, greedy, invalid, paper):
    """The "sampled" and "greedy" evaluations of one phase, as summary.json holds them."""
    return {"sampled": {"success": success, "se": 0.0, "invalid_rate": invalid,
                        "paper_success": paper, "episodes": 100},
            "greedy": {"success": greedy, "se": 0.0, "invalid_rate": 0.0,
                       "paper_success": paper, "episodes": 100}}


def fake_summary(sft, rl, greedy=None, paper=None, wall=10.0):
    """A summary.json in the new format (with "eval") or, when greedy is None, in the flat old
    one."""
    s = {"sft_success": sft, "rl_success": rl, "sft_invalid_rate": 0.1, "invalid_rate": 0.02,
         "eval_episodes": 100, "wall_seconds": wall, "config": {}}
    if greedy is not None:
        s["eval"] = {"sft": eval_mode(sft, greedy, 0.1, paper),
                     "rl": eval_mode(rl, greedy, 0.02, paper)}
    return s


def test_results_table_from_summaries_old_and_new_format(tmp_path):
    """results.md from three seeds' summaries: per-setting mean ± se with per-seed values,
    greedy and paper-measure columns where the summary has them, wall time, the paper's number."""
    for seed, (sft, rl) in enumerate([(0.2, 0.8), (0.3, 0.9), (0.4, 1.0)], 1):
        new = fake_summary(sft, rl, greedy=0.5, paper=0.7, wall=100.0 * seed)
        old = fake_summary(sft, rl)  # today's flat format: no greedy, no paper
        for key, s in [("main/numberline", new), ("main/blackjack", old)]:
            d = tmp_path / f"{key}-s{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps(s))
    reproduce.write_results(str(tmp_path), ["main"], [1, 2, 3], quick=False)
    rows = {}
    for line in (tmp_path / "results.md").read_text().splitlines():
        if line.startswith("| ") and "---" not in line:
            cells = line.split(" | ")
            rows[cells[0][2:]] = cells[1:]
    assert rows["NumberLine, SFT only"] == [
        "30.0 ± 5.8 [20.0, 30.0, 40.0]", "50.0 ± 0.0 [50.0, 50.0, 50.0]",
        "70.0 ± 0.0 [70.0, 70.0, 70.0]", "10.0 ± 0.0 [10.0, 10.0, 10.0]", "(the run below)",
        "24.8 |"]
    assert rows["NumberLine, SFT + RL"][0] == "90.0 ± 5.8 [80.0, 90.0, 100.0]"
    assert rows["NumberLine, SFT + RL"][4] == "200 ± 58 [100, 200, 300]"
    assert rows["Blackjack, SFT + RL"][1:4] == ["–", "–", "2.0 ± 0.0 [2.0, 2.0, 2.0]"]
    assert rows["Blackjack, SFT + RL"][5] == "40.2 |"


# --- scripts/reproduce.py end to end: the smallest group, then a resumed run, then nothing to do

def run_reproduce(out, capsys):
    """`reproduce.py --quick --only main --seeds 1 --out OUT` in this process (its runs are
    vlm_rl.py processes): what it printed."""
    sigterm = signal.getsignal(signal.SIGTERM)  # reproduce.main installs its own handler
    try:
        status = reproduce.main(["--quick", "--only", "main", "--seeds", "1", "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    printed = capsys.readouterr()
    assert status == 0, (printed.out + printed.err)[-3000:]
    return printed.out + printed.err


@pytest.mark.slow
def test_reproduce_quick_writes_tables_and_resumes_without_redoing_work(tmp_path, monkeypatch,
                                                                        capsys):
    """--quick runs the group's cells and writes results.md (a row per setting with per-seed
    values) and the group's plot; run again, it resumes a cell that has a checkpoint but no
    summary (with --resume) and skips finished ones; a third time there is nothing to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run_reproduce(tmp_path, capsys)
    assert "2 to run" in out
    table = [line for line in (tmp_path / "results.md").read_text().splitlines()
             if line.startswith("| ")]
    assert len(table) == 2 + len(reproduce.GROUPS["main"])  # header, rule, one row per setting
    assert all(line.count("[") >= 2 for line in table[2:])  # per-seed values of every row
    assert (tmp_path / "main.png").exists()
    nl = tmp_path / "main/numberline-s1"
    bj = tmp_path / "main/blackjack-s1"
    mtime = (nl / "summary.json").stat().st_mtime_ns
    # a run killed after its last checkpoint: no summary.json, a checkpoint -> continued with
    # --resume
    os.remove(bj / "summary.json")
    out = run_reproduce(tmp_path, capsys)
    assert "1 skipped" in out and "done (resumed)" in out and (bj / "summary.json").exists()
    commands = [line for line in (bj / "run.log").read_text().splitlines()
                if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" in commands[1]
    mtimes = [(d / "summary.json").stat().st_mtime_ns for d in (nl, bj)]
    out = run_reproduce(tmp_path, capsys)
    assert "2 skipped" in out and "0 to run" in out
    assert [(d / "summary.json").stat().st_mtime_ns for d in (nl, bj)] == mtimes
    assert mtimes[0] == mtime


# --- scripts/policy_map.py: what the Blackjack agent learned

def test_hands_have_the_requested_total_for_every_state():
    """The hands shown to the agent have the state's total and softness, the up card its
    value; 280 states."""
    rng = random.Random(0)
    for total, soft, up in policy_map.STATES:
        for _ in range(3):
            hand = policy_map.make_hand(total, soft, rng)
            assert hand_value(hand) == (total, soft) and 2 <= len(hand) <= 10
            card = policy_map.up_card(up, rng)
            assert VALUE[card[0]] == up
    assert len(policy_map.STATES) == 280


def test_majority_ties_and_invalid_answers_count_as_stand():
    """Per state the majority answer, a tie or no valid answer counting as stand; invalid
    answers counted."""
    answers = {(16, False, 10): [1, 1, 0], (15, False, 10): [1, 0],
               (14, False, 10): [None, None, None], (13, False, 10): [None, 1, None]}
    table, share, invalid = policy_map.majority(answers)
    assert table == {(16, False, 10): 1, (15, False, 10): 0, (14, False, 10): 0,
                     (13, False, 10): 1}
    assert share[(14, False, 10)] is None
    assert invalid == {(16, False, 10): 0, (15, False, 10): 0, (14, False, 10): 3,
                       (13, False, 10): 2}


def test_policy_map_exact_win_rates_and_differing_cells(tmp_path):
    """The map of the optimal policy wins 42.95% and differs nowhere; always-stand wins 38.07%
    and differs on every hit cell; a table missing a state is an error."""
    opt = blackjack_optimal()
    img, st = policy_map.policy_map(dict(opt))
    assert st["differ"] == 0 and abs(st["win"] - 0.4295) < 1e-4 and st["win"] == st["optimal_win"]
    stand = {s: 0 for s in opt}
    img2, st2 = policy_map.policy_map(stand, {s: 0.0 for s in opt}, {s: 1 for s in opt},
                                      title="always stand")
    assert abs(st2["win"] - 0.3807) < 1e-4 and st2["differ"] == sum(opt.values())
    assert img.size == img2.size and img.tobytes() != img2.tobytes()
    img2.save(tmp_path / "map.png")
    with pytest.raises(ValueError):
        policy_map.policy_map({s: 0 for s in list(opt)[1:]})


# --- scripts/episodes.py: the episode viewer, fed by evaluate's watch

def test_episode_viewer_draws_one_frame_per_step_of_the_first_k_episodes(tiny, monkeypatch):
    """record(..., 3): through evaluate's watch, a 480x400 frame for each step of the first 3
    held-out episodes, in order, each of the picture that step was played on (the first one
    dealt from EVAL_SEED + k), with the answer written under it."""
    agent, cfg = tiny
    cfg = dataclasses.replace(cfg, num_envs=4, max_new_tokens=8)
    plus = answers_from(agent, '{"action": "+"}')
    monkeypatch.setattr(vlm_rl, "generate",
                        lambda agent, inputs, *a: plus * len(inputs["input_ids"]))
    drawn = []
    real = episodes.draw_frame

    def spy(picture, answer, caption):
        drawn.append((picture.tobytes(), answer, caption))
        return real(picture, answer, caption)

    monkeypatch.setattr(episodes, "draw_frame", spy)
    frames = episodes.record(agent, NumberLine, cfg, 3)
    lengths, firsts = [], []  # "+" at every step, by hand, on episodes EVAL_SEED + 0..2
    for k in range(3):
        env = NumberLine()
        firsts.append(env.reset(seed=vlm_rl.EVAL_SEED + k)[0].tobytes())
        n = 0
        done = False
        while not done:
            *_, term, trunc, _ = env.step(1)
            n += 1
            done = term or trunc
        lengths.append(n)
    assert sum(lengths) > 3, "the hand-played episodes should not all be one step long"
    # (episode, step) of each caption
    steps = sorted(tuple(int(w.strip(",:")) for w in c.split()[1:4:2]) for _, _, c in drawn)
    assert steps == [(k + 1, s + 1) for k in range(3) for s in range(lengths[k])]
    assert {a for _, a, _ in drawn} == {'{"action": "+"}'}
    first_pictures = {c.split()[1].strip(","): p for p, _, c in drawn if " step 1:" in c}
    assert [first_pictures[str(k + 1)] for k in range(3)] == firsts
    assert sorted(frames) == [0, 1, 2] and [len(frames[k]) for k in range(3)] == lengths
    assert all(f.size == (480, 400) for k in frames for f in frames[k])
    text_area = frames[0][0].convert("L").crop((0, 214, 480, 400))
    assert text_area.getextrema()[0] < 100, "the answer is drawn under the picture"
