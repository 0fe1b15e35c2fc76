"""What a Blackjack agent learned: its hit/stand decision in every state, beside the exact
optimum.

  python scripts/policy_map.py --model runs/blackjack-s1/model  # -> the run's policy_map.png
  python scripts/policy_map.py --model RUN/model --out map.png --hands 5 --greedy

The agent is asked in every state of `envs.blackjack_optimal()`: player total 4-21 without a
usable ace, 12-21 with one, against each dealer up card A-10 (280 states). Each state is shown as
`--hands` different concrete hands (random cards with that total; a 10-valued up card is any of
10 J Q K), rendered by `envs.Blackjack`; the state's action is the majority over the valid
answers. Ties, and states whose every answer was invalid, count as "stand" in the table fed to
the exact evaluation `blackjack_outcomes`; invalid answers are counted and marked separately.
The picture: two grids per policy (usable ace above, no usable ace below; player total upward,
dealer card across), the learned table beside the optimum, cells where they differ framed in
black, with the table's exact win rate in the title.
"""
import argparse
import functools
import itertools
import json
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402

STATES = sorted(envs.blackjack_optimal())  # (player total, usable ace, dealer up value 1..10)
TENS = ["10", "J", "Q", "K"]


def blackjack_outcomes(policy):
    """Exact (win, draw, loss) probabilities of playing `policy` ({(total, soft, up): 0 stand /
    1 hit}, the states of envs.blackjack_optimal()) from a fresh deal, by the same dealer DP as
    the optimum."""
    @functools.cache
    def play(total, soft, up):
        if total > 21:
            return 0.0, 0.0, 1.0
        if policy[(total, soft, up)] == 0:
            return envs._stand(total, up)
        nxt = [(p, play(*envs._add(total, soft, v), up)) for v, p in envs.P_VALUE.items()]
        return tuple(sum(p * r[i] for p, r in nxt) for i in range(3))

    deals = []  # (probability, outcome) of each up card and two player cards
    for (up, pu), (a, pa), (b, pb) in itertools.product(envs.P_VALUE.items(), repeat=3):
        hand = envs._add(*envs._add(0, False, a), b)
        deals.append((pu * pa * pb, play(*hand, up)))
    return tuple(sum(p * r[i] for p, r in deals) for i in range(3))


def up_card(value, rng):
    """A dealer up card of value 1..10 (10: any of 10 J Q K), random suit."""
    if value == 1:
        rank = "A"
    elif value == 10:
        rank = TENS[rng.randrange(4)]
    else:
        rank = str(value)
    return rank, rng.choice(envs.SUITS)


def make_hand(total, soft, rng, max_cards=10):
    """Random cards (at least two, at most `max_cards`: what the picture shows) with
    envs.hand_value == (total, soft): cards are dealt one by one until the hand matches or
    cannot."""
    while True:
        cards = []
        while len(cards) < max_cards:
            cards.append((rng.choice(envs.RANKS), rng.choice(envs.SUITS)))
            t, s = envs.hand_value(cards)
            if (t, s) == (total, soft) and len(cards) >= 2:
                return cards
            if t > total and (soft or not s):
                break  # past it for good: only a soft hand can come back down, as hard


def ask_agent(model, hands=3, temperature=0.05, max_new_tokens=None, no_cot=None, seed=0,
              batch=64, device="cpu"):
    """{state: list of answers (0 stand, 1 hit, None invalid)}, `hands` per state;
    temperature 0 = greedy."""
    import torch
    import vlm_rl
    run = load_run_summary(model).get("config", {})  # how the run was trained, when known
    if no_cot is None:
        no_cot = run.get("no_cot", False)
    max_new_tokens = max_new_tokens or run.get("max_new_tokens", 80)
    argv = ["--env", "blackjack", "--model", model, "--device", device,
            "--max-new-tokens", str(max_new_tokens)]
    if no_cot:
        argv.append("--no-cot")
    cfg, _ = vlm_rl.parse_config(argv)
    agent = vlm_rl.load_agent(cfg, envs.Blackjack).eval()
    rng = random.Random(seed)
    env = envs.Blackjack()
    torch.manual_seed(seed)
    text = vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(env, not no_cot))
    queries = []  # (state, image)
    for i, (total, soft, up) in enumerate(STATES):
        for h in range(hands):
            env.reset(seed=seed * 100003 + i * hands + h)
            env.player = make_hand(total, soft, rng)
            env.dealer = [up_card(up, rng), up_card(rng.randint(1, 10), rng)]
            queries.append(((total, soft, up), env.render()))
    answers = {s: [] for s in STATES}
    for k in range(0, len(queries), batch):
        chunk = queries[k:k + batch]
        images = [im for _, im in chunk]
        inputs = vlm_rl.encode_prompts(agent, images, text).to(cfg.device)
        # temperature 0: greedy
        out = vlm_rl.generate(agent, inputs, temperature, cfg.max_new_tokens)
        texts = agent.tokenizer.batch_decode(out, skip_special_tokens=True)
        for (state, _), t in zip(chunk, texts):
            answers[state].append(vlm_rl.parse_action(t, env.action_names).action)
    return answers


def majority(answers):
    """(table {state: 0/1}, hit share among valid answers {state: float or None}, invalid counts
    {state: int}); a tie or no valid answer -> stand (0)."""
    table, share, invalid = {}, {}, {}
    for s, a in answers.items():
        valid = [x for x in a if x is not None]
        share[s] = sum(valid) / len(valid) if valid else None
        table[s] = int(share[s] is not None and share[s] > 0.5)
        invalid[s] = len(a) - len(valid)
    return table, share, invalid


def wrap(text, font, width):
    """Lines of `text` no wider than `width` pixels in `font`."""
    lines = [""]
    for word in text.split():
        if lines[-1] and font.getlength(f"{lines[-1]} {word}") > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


HIT, STAND = (222, 92, 72), (64, 118, 196)
PALE = {HIT: (240, 178, 165), STAND: (160, 190, 232)}


def policy_map(table, share=None, invalid=None, title="learned policy", note="", cell=24):
    """The picture and the numbers for a learned table {(total, soft, up): 0 stand / 1 hit} that
    covers every state of blackjack_optimal(). Returns (PIL image, {"win", "draw", "loss",
    "differ", "optimal_win"})."""
    opt = envs.blackjack_optimal()
    missing = set(opt) - set(table)
    if missing:
        raise ValueError(f"the table lacks {len(missing)} states, e.g. {sorted(missing)[0]}")
    win, draw, loss = blackjack_outcomes(table)
    stats = {"win": win, "draw": draw, "loss": loss, "optimal_win": blackjack_outcomes(opt)[0],
             "differ": sum(table[s] != opt[s] for s in opt)}
    f, fb, small = (ImageFont.load_default(size=n) for n in (13, 15, 11))
    left, gap, head = 34, 40, 20
    gw = 10 * cell  # grid width
    W = 2 * (left + gw) + gap + 10
    summary = (f"exact win {win:.2%} (draw {draw:.2%}, loss {loss:.2%}); "
               f"optimum {stats['optimal_win']:.2%}; "
               f"{stats['differ']} of {len(opt)} cells differ (framed).")
    text = wrap(summary, f, W - 20)
    if note:
        text += wrap(note, f, W - 20)
    ly = 30 + 18 * len(text)  # the legend's line
    top = ly + 32
    H = top + 2 * (head + 16) + 28 * cell + gap + 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=fb)
    for k, line in enumerate(text):
        d.text((10, 28 + 18 * k), line, fill="black", font=f)

    # the legend
    legend = [(HIT, "hit (H)"), (STAND, "stand (S)")]
    if share:
        legend.append((PALE[HIT], "answers split"))
    x = 10
    for color, name in legend:
        d.rectangle([x, ly, x + 12, ly + 12], fill=color, outline="gray")
        if color in PALE.values():  # both pale shades: a split hit, a split stand
            d.rectangle([x + 6, ly, x + 12, ly + 12], fill=PALE[STAND], outline="gray")
        d.text((x + 16, ly - 1), name, fill="black", font=f)
        x += 30 + int(d.textlength(name, font=f))
    if invalid:
        d.ellipse([x, ly, x + 12, ly + 12], fill="yellow", outline="black")
        d.text((x + 16, ly - 1), "some answers invalid", fill="black", font=f)

    # the grids: learned (left) and optimal (right), soft totals above hard ones
    for col, (name, tab, mine) in enumerate([("learned", table, True), ("optimal", opt, False)]):
        x0 = left + col * (left + gw + gap)
        y = top
        for soft, totals in ((True, range(21, 11, -1)), (False, range(21, 3, -1))):
            kind = "soft totals (usable ace)" if soft else "hard totals"
            d.text((x0, y), f"{name}, {kind}", fill="black", font=fb)
            y += head
            for r, total in enumerate(totals):
                d.text((x0 - 6, y + r * cell + cell // 2), str(total), fill="black", font=small,
                       anchor="rm")
                for c, up in enumerate(range(1, 11)):
                    s = (total, soft, up)
                    box = [x0 + c * cell, y + r * cell, x0 + (c + 1) * cell, y + (r + 1) * cell]
                    color = HIT if tab[s] else STAND
                    if mine and share and share[s] is not None and 0 < share[s] < 1:
                        color = PALE[color]
                    d.rectangle(box, fill=color, outline="white")
                    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
                    d.text(center, "H" if tab[s] else "S", fill="white", font=small, anchor="mm")
                    if tab[s] != opt[s]:
                        d.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1],
                                    outline="black", width=3)
                    if mine and invalid and invalid.get(s):
                        d.ellipse([box[2] - 10, box[1] + 3, box[2] - 4, box[1] + 9],
                                  fill="yellow", outline="black")
            y += len(totals) * cell
            for c, up in enumerate(range(1, 11)):
                d.text((x0 + c * cell + cell // 2, y + 3), "A" if up == 1 else str(up),
                       fill="black", font=small, anchor="ma")
            y += 16 + gap // 2
    d.text((W // 2, H - 14), "rows: player total; columns: dealer's up card", fill="black",
           font=f, anchor="mm")
    return img, stats


def load_run_summary(model):
    try:
        with open(os.path.join(os.path.dirname(os.path.normpath(model)), "summary.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", required=True, help="a saved agent: RUN/model")
    p.add_argument("--out", default=None, help="PNG path (default RUN/policy_map.png)")
    p.add_argument("--hands", type=int, default=3,
                   help="concrete hands per state (odd avoids ties)")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--greedy", action="store_true", help="argmax answers (temperature 0)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the run's own setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.hands < 1:
        p.error("--hands must be >= 1")
    T = 0.0 if a.greedy else a.temperature
    answers = ask_agent(a.model, a.hands, T, a.max_new_tokens, seed=a.seed, batch=a.batch,
                        device=a.device)
    table, share, invalid = majority(answers)
    n_inv = sum(invalid.values())
    n_all = sum(len(v) for v in answers.values())
    mc = load_run_summary(a.model).get("rl_success")
    sampling = "greedy" if a.greedy else f"T = {T}"
    note = (f"{a.hands} hands per state, {sampling}; invalid answers: {n_inv} of {n_all} "
            "(ties, all-invalid -> stand).")
    if mc:
        note += f" The run's held-out success: {mc:.2%}."
    img, st = policy_map(table, share, invalid, title=os.path.normpath(a.model), note=note)
    out = a.out or os.path.join(os.path.dirname(os.path.normpath(a.model)), "policy_map.png")
    img.save(out)
    print(f"exact outcome of the learned table: win {st['win']:.2%}, draw {st['draw']:.2%}, "
          f"loss {st['loss']:.2%} (optimum: win {st['optimal_win']:.2%})")
    if mc is not None:
        print(f"the run's held-out Monte Carlo success (summary.json rl_success): {mc:.2%}")
    no_valid = sum(v == a.hands for v in invalid.values())
    print(f"{st['differ']} of {len(STATES)} cells differ from the optimum; invalid answers "
          f"{n_inv} of {n_all} ({no_valid} states with no valid answer, counted as stand); "
          f"wrote {out}")
    return st


if __name__ == "__main__":
    main()
