import json
import random

import pytest

from envs import Blackjack, NumberLine, blackjack_optimal, blackjack_outcomes, hand_value


def numberline(current, target):
    env = NumberLine()
    env.reset(seed=0)
    env.current, env.target = current, target
    return env


# --- NumberLine

def test_numberline_moves_and_rewards():
    env = numberline(1, 3)
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc, info["current"], info["success"]) == (0.0, False, False, 2, False)
    _, r, _, _, _ = env.step(0)
    assert r == -1.0 and env.current == 1
    env.step(1)
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc, info["success"], info["steps"]) == (1.0, True, False, True, 4)


def test_numberline_blocked_at_edges():
    env = numberline(0, 3)
    _, r, term, _, _ = env.step(0)
    assert (r, term, env.current) == (-1.0, False, 0)
    env = numberline(5, 2)
    _, r, _, _, _ = env.step(1)
    assert (r, env.current) == (-1.0, 5)


def test_numberline_truncates_at_ten_steps():
    env = numberline(2, 4)
    for i in range(10):
        _, r, term, trunc, info = env.step(0)
        assert not term and trunc == (i == 9) and not info["success"]
    with pytest.raises(RuntimeError):
        env.step(0)


def test_numberline_start_differs_and_seed_determinism():
    env = NumberLine()
    for _ in range(500):
        _, info = env.reset()
        assert info["current"] != info["target"] and 0 <= info["current"] <= 5
    img1, info1 = env.reset(seed=7)
    img2, info2 = NumberLine().reset(seed=7)
    assert info1 == info2 and img1.tobytes() == img2.tobytes()
    assert img1.size == (56, 56) and img1.mode == "RGB"


def test_bad_action_and_step_after_done():
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


# --- Blackjack rules

def cards(*ranks):
    return [(r, "spades") for r in ranks]


def blackjack(player, dealer, seed=0):
    env = Blackjack()
    env.reset(seed=seed)
    env.player, env.dealer = cards(*player), cards(*dealer)
    return env


def test_hand_value_usable_ace():
    assert hand_value(cards("A", "6")) == (17, True)
    assert hand_value(cards("A", "6", "9")) == (16, False)
    assert hand_value(cards("A", "A")) == (12, True)
    assert hand_value(cards("A", "K")) == (21, True)
    assert hand_value(cards("K", "Q", "5")) == (25, False)


def test_hit_bust_and_safe_hit():
    env = blackjack(["K", "Q"], ["5", "5"])
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc, info["success"]) == (-1.0, True, False, False)
    env = blackjack(["2", "3"], ["5", "5"])
    _, r, term, _, info = env.step(1)
    assert (r, term, len(info["player"])) == (0.0, False, 3)


def test_dealer_stands_on_soft_17_and_hits_16():
    env = blackjack(["10", "8"], ["A", "6"])
    _, r, term, _, info = env.step(0)
    assert len(env.dealer) == 2 and (r, term, info["success"]) == (1.0, True, True)
    env = blackjack(["10", "8"], ["10", "6"])
    env.step(0)
    assert len(env.dealer) >= 3


@pytest.mark.parametrize("player, dealer, reward", [
    (["10", "9"], ["10", "8"], 1.0), (["10", "8"], ["10", "8"], 0.0),
    (["10", "7"], ["10", "8"], -1.0), (["10", "2"], ["10", "6"], 1.0)])
def test_stand_comparison(player, dealer, reward):
    env = blackjack(player, dealer)
    env._draw = lambda: ("K", "clubs")  # the dealer's 16 draws a K and busts
    _, r, term, _, info = env.step(0)
    assert (r, term, info["success"]) == (reward, True, reward > 0)


def test_dp_reference_values():
    win, draw, loss = blackjack_outcomes(blackjack_optimal())
    assert abs(win - 0.4295) < 1e-3 and abs(draw - 0.0945) < 1e-3 and abs(loss - 0.4760) < 1e-3
    stand = blackjack_outcomes({k: 0 for k in blackjack_optimal()})
    assert abs(stand[0] - 0.3807) < 1e-3
    policy = blackjack_optimal()
    assert policy[(20, False, 10)] == 0 and policy[(11, False, 10)] == 1 and policy[(12, True, 5)] == 1


def test_monte_carlo_matches_dp():
    env, wins, n = Blackjack(), 0, 20000
    env.render = lambda: None  # pictures are tested elsewhere; drawing 50k of them costs ~15 s
    env.reset(seed=123)
    for _ in range(n):
        env.reset()
        while True:
            *_, term, _, info = env.step(env.correct_action())
            if term:
                wins += info["success"]
                break
    assert abs(wins / n - blackjack_outcomes(blackjack_optimal())[0]) < 0.015


def test_blackjack_rendering():
    env = Blackjack()
    img, _ = env.reset(seed=3)
    assert img.size == (112, 112) and img.mode == "RGB"
    env.player = cards("2", "3")
    a = env.render().tobytes()
    env.player = cards("K", "3")
    assert env.render().tobytes() != a
    env.player = cards("A", "A", "2", "2", "3", "10", "Q")
    assert env.render().size == (112, 112)


# --- demonstrator

def test_demo_noise_zero_is_correct_with_ordered_fields():
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
    rng = random.Random(1)
    for env in (NumberLine(), Blackjack()):
        for s in range(50):
            env.reset(seed=s)
            right, wrong = env.action_names[env.correct_action()], env.action_names[1 - env.correct_action()]
            assert json.loads(env.demo(1.0, rng))["action"] == wrong
            assert env.demo(0.0, rng, cot=False) == f'{{"action": "{right}"}}'
        with pytest.raises(ValueError):
            env.demo(1.5, rng)


def test_demo_noise_fraction():
    rng, env = random.Random(2), NumberLine()
    env.reset(seed=0)
    right = env.action_names[env.correct_action()]
    hits = sum(json.loads(env.demo(0.55, rng, cot=False))["action"] == right for _ in range(2000))
    assert abs(hits / 2000 - 0.45) < 0.04
