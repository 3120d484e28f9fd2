"""The tiny text side shared by the built-in tiny models (fdfo/models/tiny_sd3.py, fdfo/models/tiny_flux.py): a CLIP
and a T5 tokenizer trained in-process on a small built-in English text, and narrow CLIP and T5 encoders of the real
transformers classes. Deterministic: the same tokenizers and (for a seeded RNG) the same weights in every process.
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
import string

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MAX_LENGTH = 77
_CLIP_VOCAB_SIZE = 1024  # 512 byte symbols (with and without "</w>") + merges + 2 specials
_T5_VOCAB_SIZE = 1000  # requested; the built-in text yields ~630 unigram pieces

# ---------------------------------------------------------------------------------------------------------------------
# Built-in training text (written for this file). Prompt-like, so that typical test prompts split into whole words
# or a few subwords rather than single bytes; composed from word lists to keep it short to read.

_SUBJECTS = (
    "cat dog horse bird fish rabbit fox bear lion tiger wolf owl eagle duck frog turtle snake elephant giraffe zebra "
    "monkey panda deer cow sheep pig chicken mouse whale dolphin shark butterfly bee dragon robot astronaut wizard "
    "knight princess child woman man girl boy chef farmer sailor painter musician dancer teacher doctor soldier "
    "car bicycle train airplane boat ship truck bus motorcycle rocket house castle tower bridge church lighthouse "
    "tree flower rose tulip sunflower mushroom cactus forest mountain river lake ocean beach island desert volcano "
    "city street village garden park field meadow waterfall cave sky cloud moon sun star planet galaxy rainbow "
    "apple banana orange lemon cherry strawberry cake pizza burger sandwich bread cheese coffee tea cup bowl plate "
    "chair table bed lamp clock book guitar piano violin drum camera phone computer umbrella hat shoe bag kite ball"
).split()
_COLORS = "red orange yellow green blue purple pink brown black white gray golden silver dark bright pale".split()
_ADJECTIVES = (
    "small big tiny huge old young happy sad sleepy angry cute fluffy shiny wooden metal glass stone paper "
    "ancient modern futuristic magical mysterious beautiful ugly strange funny quiet noisy wet dry hot cold "
    "colorful striped spotted round square tall short heavy soft hard smooth rough"
).split()
_VERBS = (
    "sitting standing running jumping flying swimming sleeping eating drinking reading writing playing singing "
    "dancing walking climbing riding holding watching looking smiling laughing painting cooking"
).split()
_PLACES = (
    "on a table|in a garden|under a tree|on the beach|in the snow|in the rain|at night|at sunset|at dawn|"
    "in a forest|on a mountain|in the city|in space|under the sea|in a kitchen|on a street|next to a window|"
    "in front of a house|on top of a hill|inside a castle|near a river|in a field of flowers|on the moon"
).split("|")
_STYLES = (
    "a photo of|a painting of|a drawing of|a sketch of|a watercolor of|an oil painting of|a cartoon of|"
    "a close-up photo of|a 3D render of|a pixel art image of|an illustration of|a portrait of"
).split("|")
_PROSE = """
Two apples and three oranges lie on the left side of a wooden table, while a blue cup stands to the right.
The photograph is sharp, detailed, high quality, with soft lighting, vivid colors and a shallow depth of field.
There are four birds on the wire; the first one is black, the second one is white, and the last two are gray.
She said, "It's late," and we'd better go home before it gets dark. They're sure you'll like it, I'm told.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 20 100 2024. Symbols: a, b. c! d? e; f: (g) [h] {i} "j" 'k' - + = / * & % $ #.
A UNIQUE image, Trending on ArtStation, 4k, 8k, ultra realistic, cinematic, masterpiece, by an unknown artist.
Early in the morning the fishermen pushed their narrow boats into the harbour and rowed past the lighthouse.
Gulls circled above the masts, screaming for scraps, and the smell of salt and tar drifted over the quay.
Later the wind changed direction, heavy clouds gathered over the hills and thunder rolled across the valley.
Children ran laughing through the puddles; their mothers called them back, shaking wet umbrellas at the door.
In the evening a lantern glowed in every window, and somebody played an accordion in the crowded tavern.
The museum keeps marble statues, bronze helmets, silk scarves, porcelain vases and embroidered velvet gowns.
Our neighbour grows carrots, potatoes, onions, cabbages, peppers, cucumbers, pumpkins and enormous tomatoes.
For breakfast we ate pancakes with honey, boiled eggs, toast with butter, yoghurt, grapes and fresh juice.
Engineers designed a lightweight vehicle with electric motors, folding wings, glowing headlights and wheels.
The detective examined the footprints, the broken window, the empty wallet and a mysterious handwritten note.
Snowflakes fell silently on the frozen pond where skaters in knitted sweaters, gloves and scarves turned circles.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty, hundred, thousand.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday; January, April, July, October, December.
Wide angle lens, macro shot, bokeh, studio lighting, golden hour, backlit, overexposed, grainy film, monochrome.
Impressionism, surrealism, cubism, baroque, renaissance, minimalism, anime, manga, comic book, ukiyo-e, vaporwave.
Her grandfather repaired clocks, sharpened knives, polished silver spoons and carved delicate wooden puppets.
Across the desert the caravan travelled slowly; camels carried spices, carpets, copper pots and woven baskets.
Scientists measured temperature, pressure, humidity and brightness, then published their surprising results.
"""


def _corpus() -> list[str]:
    """Deterministic training text for both tokenizers: ~4000 short lines, prompt-like sentences plus the prose."""
    prose = [line.strip() for line in _PROSE.strip().splitlines()]
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        # Step through the other lists with different strides so each subject meets many colours, verbs and places.
        for j in range(6):
            k = i * 7 + j * 5
            style, color = _STYLES[k % len(_STYLES)], _COLORS[k % len(_COLORS)]
            adjective, verb = _ADJECTIVES[(k * 3) % len(_ADJECTIVES)], _VERBS[(k + j) % len(_VERBS)]
            place = _PLACES[(k * 11 + j) % len(_PLACES)]
            lines.append(f"{style} a {adjective} {color} {subject} {verb} {place}")
            lines.append(f"A {color} {subject} and a {adjective} {_SUBJECTS[(i + j + 1) % len(_SUBJECTS)]}.")
    for color, adjective in itertools.product(_COLORS, _ADJECTIVES[::3]):
        lines.append(f"the {adjective}est {color} one, {adjective}er than the others")
    # Repeats give BPE pairs the minimum count of 2, and the prose enough weight that its words become tokens.
    return lines * 2 + prose * 6


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of `pair` in `symbols`, left to right, by its concatenation."""
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_bpe(word_counts: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on pre-tokenised words, CLIP style ("</w>" on each word's last symbol).

    Written out rather than using `tokenizers.trainers.BpeTrainer` because that trainer breaks ties between equally
    frequent pairs in hash-map order, which changes from process to process. Here ties go to the smallest pair.
    """
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(word_counts)}
    pairs: collections.Counter = collections.Counter()
    for w, symbols in words.items():
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += word_counts[w]
    merges = []
    while len(merges) < num_merges and pairs:
        top = max(pairs.values())
        if top < 2:
            break
        best = min(pair for pair, count in pairs.items() if count == top)
        merges.append(best)
        for w, symbols in words.items():
            merged = _merge_pair(symbols, best) if best[0] in symbols else symbols
            if merged == symbols:
                continue
            # Update the pair counts incrementally: only words containing the pair change.
            for pair, count in collections.Counter(zip(symbols, symbols[1:])).items():
                pairs[pair] -= count * word_counts[w]
                if not pairs[pair]:
                    del pairs[pair]
            for pair, count in collections.Counter(zip(merged, merged[1:])).items():
                pairs[pair] += count * word_counts[w]
            words[w] = merged
    return merges


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(tokens in id order, merges) of the tiny CLIP BPE; cached since SD3 needs two CLIP tokenizers from it."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # Split the text with the stock CLIP normaliser + pre-tokeniser so the merges match what CLIPTokenizer applies.
    backend = CLIPTokenizer().backend_tokenizer
    word_counts: collections.Counter = collections.Counter()
    for line, repeats in collections.Counter(_corpus()).items():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            word_counts[word] += repeats

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_bpe(word_counts, _CLIP_VOCAB_SIZE - len(tokens) - 2)
    tokens += [a + b for a, b in merges] + [_BOS, _EOS]
    assert len(set(tokens)) == len(tokens), "each merge yields a new symbol"
    return tuple(tokens), tuple(merges)


def tiny_clip_tokenizer(pad_token: str = _EOS):
    """A small byte-level BPE CLIP tokenizer (1024 tokens) learned in-process from the built-in text; deterministic.

    Layout mirrors the real CLIP vocabulary: the 256 byte symbols, the same with the "</w>" end-of-word suffix, then
    the merged tokens in merge order, then `<|startoftext|>` and `<|endoftext|>` as the two highest ids (CLIP's pooled
    output may locate the end token by argmax of the ids). `pad_token` defaults to `<|endoftext|>` as in SD3's first
    tokenizer; SD3's second tokenizer pads with "!".
    """
    from transformers import CLIPTokenizer

    tokens, merges = _clip_bpe()
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=_CLIP_MAX_LENGTH,
    )


def tiny_t5_tokenizer():
    """A small (~630-piece) unigram T5 tokenizer trained with sentencepiece in memory; deterministic.

    Uses T5's id layout (<pad>=0, </s>=1, <unk>=2) and 100 `<extra_id_N>` sentinels. Normalisation is the identity
    because the fast tokenizer is built without sentencepiece's precompiled NFKC map.
    """
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=_T5_VOCAB_SIZE,
        model_type="unigram",
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # one thread keeps the EM steps, hence the pieces and scores, reproducible
        character_coverage=1.0,
        required_chars=string.ascii_letters + string.digits + string.punctuation,  # so plain ASCII never hits <unk>
        hard_vocab_limit=False,  # the built-in text supports only ~630 pieces; take what it gives
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5TokenizerFast(vocab=vocab, extra_ids=100, model_max_length=512)  # 512 as in SD3's tokenizer_3


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders. Widths differ on purpose (CLIP 32 and 48, T5 96, the tiny transformers 32) so a mixed-up dimension
# fails loudly; the CLIP widths sum to less than T5's as in SD3 (768 + 1280 < 4096), so the zero-padding path of SD3's
# encode_prompt is exercised.

CLIP_WIDTHS = (32, 48)  # hidden size = projection dim, as in CLIP-L/14 and CLIP-bigG/14
T5_WIDTH = 96


def clip_text_encoder(tokenizer, width: int, hidden_act: str, projection_dim: int | None = None):
    """CLIP text tower with projection; 2 layers because SD3 reads the penultimate hidden state."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection_dim or width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def t5_encoder(tokenizer, d_model: int = T5_WIDTH):
    """T5 v1.1-style encoder (gated GELU) as used by SD3, only narrow and two layers deep."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()
