"""Regenerate the demo's sentence sets (source checkout): ``python -m sparsecore.data.make_sentences``.

Writes two disjoint files next to this script (one sentence per line, UTF-8):

    calibration.txt   sentences the pruners see (input statistics, refit, distillation)
    heldout.txt       sentences only the evaluation sees (fidelity, retrieval)

The sentences come from a small hand-written grammar (topics x frames x slot fillers)
sampled with fixed seeds, so the files are reproducible and owe nothing to any corpus.
Held-out sentences use frames the calibration set never uses as well as shared ones, and
no sentence appears in both files.
"""
from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TOPICS = {
    "cooking": dict(
        who=["the chef", "my grandmother", "a young baker", "the night cook", "our neighbour", "the pastry team"],
        act=["slowly roasted", "carefully sliced", "burned", "seasoned", "baked", "stirred", "tasted", "froze"],
        thing=["the onions", "a loaf of rye bread", "fresh tomatoes", "the lamb shoulder", "a lemon tart",
               "the mushroom soup", "two dozen dumplings", "a pot of rice", "the garlic butter"],
        place=["in the tiny kitchen", "at the food market", "over an open fire", "in a cast iron pan",
               "behind the restaurant", "at the village fair"],
        adj=["crispy", "bland", "spicy", "delicious", "overcooked", "sweet", "salty", "fragrant"]),
    "weather": dict(
        who=["the forecaster", "a farmer", "the pilot", "the ski instructor", "the harbour master", "a hiker"],
        act=["warned about", "predicted", "watched", "measured", "complained about", "waited out", "recorded"],
        thing=["heavy rain", "a thunderstorm", "the first snow", "a long heat wave", "strong coastal winds",
               "thick morning fog", "freezing drizzle", "a dry spell", "hailstones the size of marbles"],
        place=["over the mountains", "along the coast", "in the valley", "near the airport", "across the plains",
               "above the northern lakes"],
        adj=["cold", "humid", "stormy", "mild", "windy", "grey", "scorching", "unpredictable"]),
    "software": dict(
        who=["the developer", "our build server", "a junior engineer", "the security team", "the maintainer",
             "the database administrator"],
        act=["fixed", "deployed", "refactored", "rolled back", "profiled", "reviewed", "broke", "documented"],
        thing=["the login service", "a memory leak", "the release branch", "the payment API", "a flaky test",
               "the search index", "an old migration script", "the caching layer", "the mobile app"],
        place=["on the staging cluster", "in production", "before the code freeze", "during the outage",
               "on a laptop", "in the continuous integration pipeline"],
        adj=["slow", "stable", "buggy", "fast", "outdated", "secure", "fragile", "well tested"]),
    "sports": dict(
        who=["the goalkeeper", "the coach", "a rookie sprinter", "the home team", "the referee", "the captain"],
        act=["won", "lost", "trained for", "celebrated", "argued about", "prepared for", "watched", "missed"],
        thing=["the final match", "a penalty kick", "the marathon", "the championship", "a close race",
               "the season opener", "an overtime goal", "the relay", "a world record attempt"],
        place=["at the stadium", "on a muddy pitch", "in the indoor arena", "on the track", "at the away ground",
               "in front of a quiet crowd"],
        adj=["exhausting", "thrilling", "disappointing", "tense", "historic", "lucky", "brutal", "close"]),
    "medicine": dict(
        who=["the nurse", "a surgeon", "the pharmacist", "the patient", "a medical student", "the radiologist"],
        act=["examined", "prescribed", "treated", "diagnosed", "monitored", "explained", "reviewed", "scheduled"],
        thing=["a broken wrist", "the blood test results", "a mild fever", "the allergy medication",
               "a routine check-up", "the x-ray images", "a persistent cough", "the vaccine dose", "back pain"],
        place=["at the clinic", "in the emergency room", "at the pharmacy", "during the night shift",
               "in the hospital ward", "over a video call"],
        adj=["painful", "routine", "serious", "minor", "chronic", "urgent", "harmless", "rare"]),
    "finance": dict(
        who=["the investor", "a small bakery owner", "the central bank", "the accountant", "a retired teacher",
             "the startup founder"],
        act=["borrowed", "invested in", "sold", "paid off", "audited", "lost money on", "saved for", "priced"],
        thing=["a mortgage", "government bonds", "the quarterly budget", "shares of a railway company",
               "the annual tax return", "a small business loan", "a pension fund", "foreign currency",
               "the office lease"],
        place=["at the bank", "before the market closed", "during the recession", "at the end of the year",
               "through an online broker", "in a crowded trading room"],
        adj=["risky", "profitable", "expensive", "cheap", "volatile", "safe", "overdue", "generous"]),
    "travel": dict(
        who=["the tourists", "a lost traveller", "the tour guide", "my cousin", "the flight attendant",
             "a backpacker"],
        act=["booked", "missed", "explored", "photographed", "cancelled", "visited", "recommended", "crossed"],
        thing=["the night train", "an old castle", "a ferry to the island", "the museum of modern art",
               "a cheap hostel", "the mountain pass", "a guided walking tour", "the desert road",
               "a crowded beach"],
        place=["in the old town", "near the border", "on a rainy afternoon", "during the holidays",
               "at the central station", "far from the city"],
        adj=["beautiful", "crowded", "peaceful", "overpriced", "remote", "charming", "noisy", "unforgettable"]),
    "science": dict(
        who=["the chemist", "a graduate student", "the telescope team", "the biologist", "our physics teacher",
             "the research group"],
        act=["measured", "discovered", "simulated", "published", "replicated", "observed", "tested", "modelled"],
        thing=["a new enzyme", "the orbit of a comet", "the boiling point of the solution", "a rare mineral",
               "the spread of the virus", "a faint radio signal", "the bacteria samples", "the protein structure",
               "a gravitational wave"],
        place=["in the laboratory", "at the observatory", "on the research vessel", "in a field study",
               "with a supercomputer", "under the microscope"],
        adj=["surprising", "precise", "controversial", "tiny", "unexpected", "reproducible", "faint", "novel"]),
    "home": dict(
        who=["my sister", "the landlord", "the kids", "our old cat", "the plumber", "a new tenant"],
        act=["painted", "cleaned", "repaired", "moved", "ignored", "decorated", "broke", "replaced"],
        thing=["the kitchen sink", "the garden fence", "a leaking roof", "the living room sofa",
               "the broken window", "a stack of boxes", "the washing machine", "the front door", "the bookshelf"],
        place=["on Sunday morning", "in the basement", "after dinner", "before the guests arrived",
               "in the attic", "at the new flat"],
        adj=["dusty", "cosy", "cluttered", "bright", "damp", "spacious", "quiet", "shabby"]),
    "music": dict(
        who=["the drummer", "a street violinist", "the choir", "the producer", "my piano teacher", "the band"],
        act=["recorded", "rehearsed", "performed", "composed", "remixed", "tuned", "cancelled", "released"],
        thing=["a new album", "the opening song", "an old jazz standard", "the symphony", "a short lullaby",
               "the encore", "a cover of a folk tune", "the guitar solo", "a live session"],
        place=["in a small club", "at the festival", "in the concert hall", "in a home studio",
               "on the radio", "under the bridge"],
        adj=["loud", "melancholic", "catchy", "beautiful", "out of tune", "energetic", "gentle", "experimental"]),
}

TIMES = ["yesterday", "last week", "this morning", "two years ago", "every summer", "on Friday night",
         "at dawn", "after lunch", "later that evening", "once again"]

SHARED_FRAMES = [
    "{who} {act} {thing} {place}.",
    "{Time}, {who} {act} {thing}.",
    "{who} {act} {thing} {time}, and it was {adj}.",
    "Why has {who} {act} {thing} {place}?",
    "It was {adj} when {who} {act} {thing}.",
    "Everyone agreed that {thing} was {adj}.",
    "{who} said that {thing} seemed {adj} {place}.",
]
CALIB_ONLY_FRAMES = [
    "I heard that {who} {act} {thing} {place} {time}.",
    "According to {who}, {thing} was surprisingly {adj}.",
    "Nobody expected {thing} to be so {adj} {place}.",
    "{who} {act} {thing}; later, {who2} {act2} {thing2}.",
]
HELDOUT_ONLY_FRAMES = [
    "Did {who} really think {thing} would be {adj}?",
    "{Time} {who} {act} {thing}, which felt {adj}.",
    "The story about how {who} {act} {thing} {place} is still told.",
]


def _sentence(rng: random.Random, frames: list[str]) -> str:
    topic, other = rng.sample(list(TOPICS.values()), 2)
    pick = lambda key, t=topic: rng.choice(t[key])
    time = rng.choice(TIMES)
    s = rng.choice(frames).format(who=pick("who"), act=pick("act"), thing=pick("thing"), place=pick("place"),
                                  adj=pick("adj"), time=time, Time=time[0].upper() + time[1:],
                                  who2=pick("who", other), act2=pick("act", other), thing2=pick("thing", other))
    return s[0].upper() + s[1:]


def make(n: int, frames: list[str], seed: int, exclude: set[str]) -> list[str]:
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        s = _sentence(rng, frames)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def main(n_calib: int = 4096, n_heldout: int = 1024) -> None:
    heldout = make(n_heldout, SHARED_FRAMES + HELDOUT_ONLY_FRAMES, seed=2, exclude=set())
    calib = make(n_calib, SHARED_FRAMES + CALIB_ONLY_FRAMES, seed=1, exclude=set(heldout))
    (HERE / "heldout.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    (HERE / "calibration.txt").write_text("\n".join(calib) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
