"""Phrase banks of the token-edit operator and word lists of the elimination rules (data; our wording).

Tokenized once when the env is built (``token_edit.build_token_edit``). The in-depth clauses are
10 to 20 words, like the additions the paper's instructor prompts ask for. In ``CONCRETE_TERMS`` no
specific phrase contains a generic one, so repeated concretizing cannot loop (a test checks it).
"""

from __future__ import annotations

BANKS: dict[str, tuple[str, ...]] = {
    "add_constraints": (
        "Keep the answer under 150 words and avoid technical jargon.",
        "Use exactly three bullet points, each starting with a verb.",
        "Mention at least one drawback and one practical way to reduce it.",
        "Write for a reader aged about twelve and define every unusual term you use.",
        "Include one number or statistic and say where a reader could check it.",
        "Do not use the words good, bad or very anywhere in the response.",
        "Finish with a single sentence that sums up the main point.",
        "Fit the whole response in one paragraph written in the second person.",
        "Refer to two different kinds of sources, for example a printed article and an interview.",
        "Stay within a budget of 50 dollars in every suggestion you make.",
        "Every sentence must contain fewer than twenty words.",
        "Address a beginner and an expert in two clearly labelled parts.",
    ),
    "deepening": (
        "Go beyond the obvious answer and explain the underlying causes.",
        "Discuss at least two competing viewpoints and say which one the evidence supports better.",
        "Explain how the answer would change over the next ten years.",
        "Analyse the trade-offs involved and who gains or loses from each choice.",
        "Connect the topic to its wider historical or scientific context.",
        "Identify a common misconception about this and correct it with evidence.",
        "Consider the long-term consequences as well as the immediate ones.",
        "Explain why experts still disagree about parts of this question.",
    ),
    # Appended by concretizing only when no generic term of CONCRETE_TERMS is left to swap.
    "concretizing": (
        "Ground the answer in one named, real-world example.",
        "Use a specific case from a particular country and decade.",
        "Refer to a concrete product, place or person rather than broad categories.",
        "Give precise figures, dates or names wherever you can.",
    ),
    "increase_reasoning_steps": (
        "Work through it step by step, stating each intermediate result.",
        "First list the facts you need, then reason from them to a conclusion.",
        "Break the task into numbered stages and justify each stage before moving on.",
        "Show your reasoning in at least three explicit steps before the final answer.",
        "Start by stating your assumptions, then derive the answer from them one step at a time.",
        "Compare two possible approaches, evaluate each of them, and only then choose one.",
    ),
    "complicate_input": (
        "Use this table as input: | item | cost | weight | | tent | 120 | 3 | | stove | 45 | 1 | | lamp | 20 | 0 |",
        'Base the answer on this JSON input: { "city": "Porto", "days": 3, "budget": 400, "interests": ["food", "tiles", "music"] }',
        'Input data: { "students": 28, "average_score": 71, "lowest": 42, "highest": 97 }',
        "Use the following table: | year | visitors | revenue | | 2019 | 1200 | 8400 | | 2020 | 310 | 2100 |",
        'Consider this record: { "name": "Ada", "role": "nurse", "shift_hours": 12, "patients": 9 }',
        "Work with these readings: | day | temperature | rainfall | | Mon | 14 | 2 | | Tue | 17 | 0 | | Wed | 11 | 9 |",
    ),
    # Breadth: a frame put before another seed instruction of the same domain.
    "breadth": (
        "Staying in the same field but choosing a rarer angle:",
        "A less common task from the same domain:",
        "Take an unusual, seldom asked direction on this:",
        "In the same area, about something seldom discussed:",
    ),
}

# Generic term -> specific replacements (concretizing). Lower-case, matched mid-sentence.
CONCRETE_TERMS: dict[str, tuple[str, ...]] = {
    "an animal": ("a red fox living near a railway line", "an octopus on a coral reef", "a migrating arctic tern"),
    "a city": ("Lisbon after the 1755 earthquake", "present-day Nairobi", "Kyoto during cherry blossom season"),
    "a country": ("Iceland", "Bolivia", "Vietnam"),
    "a dish": ("Sicilian caponata", "Ethiopian injera with lentils", "Korean kimchi stew"),
    "a book": ("Mary Shelley's Frankenstein", "Chinua Achebe's Things Fall Apart"),
    "a technology": ("lithium-ion batteries", "CRISPR gene editing", "satellite navigation"),
    "a company": ("a forty-person bicycle repair cooperative", "a regional airline with six aircraft"),
    "a person": ("a retired marine biologist", "a first-year nursing student", "a night-shift taxi driver"),
    "people": ("commuters in Mumbai", "first-time home buyers", "volunteer firefighters"),
    "a place": ("a lighthouse on the Scottish coast", "an abandoned metro station"),
    "a product": ("a solar-powered water purifier", "noise-cancelling headphones"),
    "a sport": ("ultimate frisbee", "cricket", "bouldering"),
    "a problem": ("a leaking kitchen pipe", "rising rents in student towns"),
    "a topic": ("urban beekeeping", "the history of the printing press"),
    "a game": ("chess", "the card game Hanabi"),
    "an event": ("the 1969 Moon landing", "a village harvest festival"),
    "a plant": ("a fig tree", "wild garlic"),
    "a tool": ("a torque wrench", "a spreadsheet pivot table"),
    "a program": ("a Python script that renames photos", "a command-line backup utility"),
    "a story": ("a ghost story set on a night train", "a fable about a stubborn lighthouse keeper"),
    "a machine": ("a 3D printer", "a steam locomotive"),
    "a disease": ("type 2 diabetes", "malaria"),
    "a holiday": ("Diwali", "Thanksgiving", "the Lunar New Year"),
    "an instrument": ("the cello", "a Japanese koto"),
    "a planet": ("Mars", "Jupiter's moon Europa"),
    "a job": ("air traffic controller", "pastry chef"),
    "a material": ("bamboo", "recycled aluminium"),
    "a skill": ("public speaking", "touch typing"),
    "a historical figure": ("Ada Lovelace", "Ibn Battuta"),
    "a language": ("Welsh", "Swahili"),
    "a habit": ("a daily ten-minute walk", "keeping a paper journal"),
    "a building": ("the Sydney Opera House", "a timber-framed barn"),
}

# WizardLM's template-copy rule: these marker phrases must not leak into an evolved instruction.
TEMPLATE_PHRASES: tuple[str, ...] = (
    "given prompt",
    "rewritten prompt",
    "created prompt",
    "original instruction:",
    "rewritten instruction:",
    "new instruction:",
)

# Words that carry no content (the "only punctuation and stop words" rule).
STOPWORDS: frozenset[str] = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she should
    so some such than that the their theirs them themselves then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves""".split()
)

SORRY_WORD = "sorry"
