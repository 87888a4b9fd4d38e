//! Caption metrics as the COCO caption evaluation (pycocoevalcap) computes them: corpus BLEU-1..4
//! and CIDEr-D over captions tokenized like its PTB tokenizer, plus the prediction and
//! reference file formats `zoo eval caption` reads.
//!
//! - [`ptb_tokenize`]: pycocoevalcap's `PTBTokenizer` (Stanford PTBTokenizer 3.4.1 with
//!   `-preserveLines -lowerCase`, then its `PUNCTUATIONS` removed), re-implemented for ordinary
//!   English captions; where it differs from the Java tokenizer is listed on the function.
//! - [`bleu`]: `bleu/bleu_scorer.py`'s corpus BLEU with the "closest" reference length.
//! - [`cider_d`]: `cider/cider_scorer.py`'s CIDEr-D (document frequencies over the references
//!   of the evaluated images, σ = 6, clipped counts, ×10).
//! - [`score_captions`]: tokenize and score; [`evaluate_files`] does the same from a
//!   predictions file and a references file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// BLEU-1..4 and CIDEr-D over `n` images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaptionScores {
    /// BLEU-1, BLEU-2, BLEU-3, BLEU-4 (pycocoevalcap's `Bleu_1` … `Bleu_4`).
    pub bleu: [f64; 4],
    /// CIDEr-D (pycocoevalcap's `CIDEr`).
    pub cider: f64,
    pub n: usize,
}

/// Scores one candidate caption per image against that image's reference captions, tokenizing
/// both with [`ptb_tokenize`] as pycocoevalcap's `COCOEvalCap.evaluate` does.
///
/// Fails if the lists differ in length, are empty, or an image has no references.
pub fn score_captions<C: AsRef<str>, R: AsRef<str>>(
    candidates: &[C],
    references: &[Vec<R>],
) -> Result<CaptionScores> {
    if candidates.len() != references.len() {
        return Err(Error::Input(format!(
            "{} candidate captions but {} reference sets",
            candidates.len(),
            references.len()
        )));
    }
    if candidates.is_empty() {
        return Err(Error::Input("no captions to score".into()));
    }
    if let Some(i) = references.iter().position(Vec::is_empty) {
        return Err(Error::Input(format!("image {i} has no reference captions")));
    }
    let cands: Vec<Vec<String>> = candidates
        .iter()
        .map(|c| ptb_tokenize(c.as_ref()))
        .collect();
    let refs: Vec<Vec<Vec<String>>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| ptb_tokenize(r.as_ref())).collect())
        .collect();
    Ok(CaptionScores {
        bleu: bleu(&cands, &refs),
        cider: cider_d(&cands, &refs),
        n: cands.len(),
    })
}

// ---------------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------------

/// The tokens pycocoevalcap's `ptbtokenizer.py` drops after tokenizing (`PUNCTUATIONS`). The
/// bracket names are upper case there while `-lowerCase` makes the tokenizer print them in
/// lower case, so brackets survive as the words `-lrb-`, `-rrb-`, … in the real pipeline too.
const PUNCTUATIONS: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Abbreviations after which the 3.4.1 tokenizer keeps the period on the word even before a
/// lower-case word (observed by running it; words such as `approx.`, `fig.`, `lb.` or `no.`
/// before a non-number lose their period there, and so here).
const ABBREVIATIONS: [&str; 64] = [
    "adm", "al", "apr", "assn", "assoc", "aug", "ave", "blvd", "bros", "capt", "cf", "co", "col",
    "corp", "cos", "dec", "dept", "dr", "esq", "est", "etc", "ext", "feb", "fri", "ft", "gen",
    "gov", "hon", "inc", "intl", "jan", "jr", "jul", "jun", "lt", "ltd", "maj", "mar", "messrs",
    "mfg", "mo", "mon", "mr", "mrs", "ms", "mt", "natl", "nov", "oct", "ph", "plc", "pres", "prof",
    "pvt", "rd", "rep", "rev", "sen", "sep", "sept", "sgt", "sq", "sr", "st",
];

/// Words the tokenizer splits in two, Penn Treebank style.
const SPLIT_WORDS: [(&str, &str, &str); 8] = [
    ("cannot", "can", "not"),
    ("gonna", "gon", "na"),
    ("gotta", "got", "ta"),
    ("wanna", "wan", "na"),
    ("lemme", "lem", "me"),
    ("gimme", "gim", "me"),
    ("'tis", "'t", "is"),
    ("'twas", "'t", "was"),
];

/// Clitics split off the end of a word (`n't` is handled first, by [`split_clitics`]).
const CLITICS: [&str; 6] = ["'s", "'re", "'ve", "'ll", "'d", "'m"];

/// Words that start with an apostrophe and keep it (`'em`, `'cause`, `'90s`), rather than
/// the apostrophe being an opening quote.
const APOSTROPHE_WORDS: [&str; 5] = ["em", "cause", "til", "tis", "twas"];

/// Tokenizes a caption as pycocoevalcap's `PTBTokenizer.tokenize` does: Stanford
/// PTBTokenizer 3.4.1 with `-preserveLines -lowerCase`, then its punctuation list removed.
///
/// So the tokens are lower case; `,` `;` `:` `.` `!` `?` quotes, apostrophes used as quotes,
/// `-` and `--` (and Unicode dashes and `…`) are split off and dropped; the clitics `n't`
/// (`can't` → `ca n't`, `won't` → `wo n't`), `'s` `'re` `'ve` `'ll` `'d` `'m` are split off and
/// kept; `cannot`/`gonna`/`wanna`/… are split; a period stays on single letters,
/// dotted abbreviations (`u.s.`, `e.g.`, `a.m.`) and [`ABBREVIATIONS`]; numbers keep their
/// inner `.` `,` `:` (`3.5`, `1,000`, `10:30`); hyphenated words stay whole; brackets become
/// `-lrb-` `-rrb-` `-lsb-` `-rsb-` `-lcb-` `-rcb-` and are kept (see [`PUNCTUATIONS`]); runs of
/// two or more `!`/`?` are kept as one token; `$ % * + = < > & # @ ~ ^ |` stand alone (`#tag`
/// and `@name` stay whole, `£` becomes `#`); characters outside the Basic Multilingual Plane
/// (emoji) are dropped, as the Java tokenizer drops them with an "Untokenizable" warning.
///
/// Known differences from the Java tokenizer (none occur in ordinary captions): `rock'n'roll`,
/// `more'n`, `y'all` stay whole (Java: `rock 'n' roll`, `more 'n`, `y' all`); `12:30pm` and
/// `5p.m.` stay whole (Java: `12:30 pm`, `5p . m.`); `2+2` gives `2 + 2` (Java: `2 +2`);
/// an abbreviation missing from [`ABBREVIATIONS`] loses its period; Unicode fractions,
/// currency signs other than `£`, and HTML entities are not normalized.
pub fn ptb_tokenize(caption: &str) -> Vec<String> {
    ptb_tokens(caption)
        .into_iter()
        .filter(|t| !PUNCTUATIONS.contains(&t.as_str()))
        .collect()
}

/// The tokenizer's own output, before pycocoevalcap removes punctuation.
fn ptb_tokens(caption: &str) -> Vec<String> {
    let chars: Vec<char> = caption
        .chars()
        .map(|c| match c {
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{2032}' => '\'',
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{2033}' => '"',
            '\u{00a3}' => '#',
            c => c,
        })
        .collect();
    let mut tokens = Vec::new();
    let at = |i: usize| chars.get(i).copied();
    let word_start =
        |i: usize| i == 0 || chars[i - 1].is_whitespace() || "([{".contains(chars[i - 1]);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = at(i + 1);
        let starts_word = c.is_alphanumeric()
            || (c == '\'' && word_start(i) && apostrophe_word(&chars[i + 1..]))
            || ((c == '#' || c == '@') && next.is_some_and(char::is_alphabetic))
            || (c == '-' && word_start(i) && next.is_some_and(|n| n.is_ascii_digit()));
        if starts_word {
            let start = i;
            i += 1;
            while i < chars.len() {
                if chars[i].is_alphanumeric() {
                    i += 1;
                } else if joins(chars[i - 1], chars[i], at(i + 1)) {
                    i += 2;
                } else {
                    break;
                }
            }
            let mut word: String = chars[start..i].iter().collect();
            if at(i) == Some('.') && keeps_period(&word, &chars[i + 1..]) {
                word.push('.');
                i += 1;
            }
            push_word(&word.to_lowercase(), &mut tokens);
            continue;
        }
        let run = chars[i..].iter().take_while(|&&r| r == c).count();
        match c {
            _ if c.is_whitespace() => {}
            '.' => match run {
                1 | 2 => tokens.extend(std::iter::repeat_n(".".to_string(), run)),
                _ => tokens.push("...".into()),
            },
            '\u{2026}' => tokens.push("...".into()),
            '!' | '?' => {
                let run = chars[i..].iter().take_while(|r| "!?".contains(**r)).count();
                tokens.push(chars[i..i + run].iter().collect());
                i += run;
                continue;
            }
            '-' => tokens.push(if run == 1 { "-" } else { "--" }.into()),
            '\u{2013}' | '\u{2014}' => tokens.push("--".into()),
            '"' => tokens.push(if word_start(i) { "``" } else { "''" }.into()),
            '\'' => tokens.push(if word_start(i) { "`" } else { "'" }.into()),
            '(' => tokens.push("-lrb-".into()),
            ')' => tokens.push("-rrb-".into()),
            '[' => tokens.push("-lsb-".into()),
            ']' => tokens.push("-rsb-".into()),
            '{' => tokens.push("-lcb-".into()),
            '}' => tokens.push("-rcb-".into()),
            c if u32::from(c) > 0xffff => {}
            c => tokens.push(c.to_lowercase().collect()),
        }
        // Runs of periods and dashes are one token each; everything else is one character.
        i += if matches!(c, '.' | '-') { run } else { 1 };
    }
    tokens
}

/// Whether `connector` between `prev` and `next` joins them into one word: hyphenated words,
/// dotted abbreviations and decimals, `1,000`, `10:30`, `a/b`, `at&t`, `o'clock`/`man's`
/// (clitics are split off afterwards).
fn joins(prev: char, connector: char, next: Option<char>) -> bool {
    let Some(next) = next else { return false };
    match connector {
        '-' | '.' | '/' | '_' | '@' => next.is_alphanumeric(),
        ',' | ':' => prev.is_ascii_digit() && next.is_ascii_digit(),
        '&' => prev.is_alphabetic() && next.is_alphabetic(),
        '\'' => next.is_alphabetic(),
        _ => false,
    }
}

/// Whether the text after an apostrophe at the start of a word makes a word that keeps it
/// (`'em`, `'90s`) rather than the apostrophe being an opening quote.
fn apostrophe_word(rest: &[char]) -> bool {
    let word: String = rest
        .iter()
        .take_while(|c| c.is_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    word.starts_with(|c: char| c.is_ascii_digit()) || APOSTROPHE_WORDS.contains(&word.as_str())
}

/// Whether a period right after `word` stays on it (`rest` is the text after the period).
fn keeps_period(word: &str, rest: &[char]) -> bool {
    if rest.first() == Some(&'.') && rest.get(1) == Some(&'.') {
        return false;
    }
    let lower = word.to_lowercase();
    let letters_and_dots = lower.chars().all(|c| c.is_alphabetic() || c == '.');
    let single_letter = lower.chars().count() == 1 && letters_and_dots;
    let dotted = lower.contains('.') && letters_and_dots;
    let number_follows = || {
        rest.iter()
            .find(|c| !c.is_whitespace())
            .is_some_and(char::is_ascii_digit)
    };
    single_letter
        || dotted
        || ABBREVIATIONS.contains(&lower.as_str())
        || (lower == "no" && number_follows())
}

/// Pushes a lower-cased word, split into its stem and clitics.
fn push_word(word: &str, tokens: &mut Vec<String>) {
    if let Some((_, a, b)) = SPLIT_WORDS.iter().find(|(w, _, _)| *w == word) {
        tokens.extend([a.to_string(), b.to_string()]);
        return;
    }
    let (stem, clitics) = split_clitics(word);
    tokens.push(stem.to_string());
    tokens.extend(clitics.into_iter().rev().map(str::to_string));
}

/// Splits trailing clitics off `word` (`wouldn't've` → `would`, [`'ve`, `n't`] in reverse).
fn split_clitics(word: &str) -> (&str, Vec<&str>) {
    let mut stem = word;
    let mut clitics = Vec::new();
    loop {
        let clitic = std::iter::once("n't")
            .chain(CLITICS)
            .find(|c| stem.len() > c.len() && stem.ends_with(c));
        match clitic {
            Some(c) => {
                clitics.push(&stem[stem.len() - c.len()..]);
                stem = &stem[..stem.len() - c.len()];
            }
            None => return (stem, clitics),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scores
// ---------------------------------------------------------------------------------------------

/// Highest n-gram order of BLEU and CIDEr.
const MAX_N: usize = 4;

/// Counts of every 1..=4-gram of `tokens` (pycocoevalcap's `precook`).
fn ngram_counts(tokens: &[String]) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for k in 1..=MAX_N {
        for gram in tokens.windows(k) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU-1..4 of tokenized `candidates` (one per image) against each image's tokenized
/// `references`, as pycocoevalcap's `Bleu(4).compute_score`: n-gram matches clipped by the
/// most any one reference has, summed over the corpus; the brevity penalty uses, per image,
/// the reference length closest to the candidate's (the shorter on a tie), summed; and the
/// smoothing constants `tiny` = 1e-15 and `small` = 1e-9 of `BleuScorer.compute_score`.
pub fn bleu(candidates: &[Vec<String>], references: &[Vec<Vec<String>>]) -> [f64; 4] {
    const TINY: f64 = 1e-15;
    const SMALL: f64 = 1e-9;
    let (mut test_len, mut ref_len) = (0usize, 0usize);
    let mut guess = [0usize; MAX_N];
    let mut correct = [0usize; MAX_N];
    for (cand, refs) in candidates.iter().zip(references) {
        let mut max_counts: HashMap<&[String], usize> = HashMap::new();
        for r in refs {
            for (gram, count) in ngram_counts(r) {
                let m = max_counts.entry(gram).or_insert(0);
                *m = (*m).max(count);
            }
        }
        for (gram, count) in ngram_counts(cand) {
            correct[gram.len() - 1] += count.min(max_counts.get(gram).copied().unwrap_or(0));
        }
        for (k, g) in guess.iter_mut().enumerate() {
            *g += cand.len().saturating_sub(k);
        }
        test_len += cand.len();
        ref_len += refs
            .iter()
            .map(Vec::len)
            .min_by_key(|&l| (l.abs_diff(cand.len()), l))
            .unwrap_or(0);
    }
    let mut scores = [0.0; MAX_N];
    let mut product = 1.0;
    for k in 0..MAX_N {
        product *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        scores[k] = product.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (test_len as f64 + TINY) / (ref_len as f64 + SMALL);
    if ratio < 1.0 {
        for s in &mut scores {
            *s *= (1.0 - 1.0 / ratio).exp();
        }
    }
    scores
}

/// CIDEr-D of tokenized `candidates` (one per image) against each image's tokenized
/// `references`, as pycocoevalcap's `Cider().compute_score` (Vedantam et al. 2015, eq. 2–4
/// with the "-D" changes): n-grams weighted by tf·idf with document frequencies counted over
/// the reference sets of these images and log(#images) as the idf numerator; per order
/// n = 1..4 the cosine of candidate and reference with the candidate's weights clipped at the
/// reference's, times exp(−Δ²/(2σ²)) with σ = 6; averaged over orders and references, ×10,
/// and averaged over images.
///
/// Δ is the difference in *bigram* counts (`counts2vec` adds up the `n == 1` index, i.e.
/// bigrams), which equals the difference in lengths unless a caption has 0 or 1 tokens.
pub fn cider_d<'a>(candidates: &'a [Vec<String>], references: &'a [Vec<Vec<String>>]) -> f64 {
    const SIGMA: f64 = 6.0;
    if candidates.is_empty() {
        return 0.0;
    }
    let ref_counts: Vec<Vec<HashMap<&'a [String], usize>>> = references
        .iter()
        .map(|refs| refs.iter().map(|r| ngram_counts(r)).collect())
        .collect();
    let mut doc_freq: HashMap<&'a [String], f64> = HashMap::new();
    for refs in &ref_counts {
        let grams: HashSet<&[String]> = refs.iter().flat_map(|r| r.keys().copied()).collect();
        for gram in grams {
            *doc_freq.entry(gram).or_insert(0.0) += 1.0;
        }
    }
    let log_n = (candidates.len() as f64).ln();
    let vector = |counts: &HashMap<&'a [String], usize>| tfidf(counts, &doc_freq, log_n);
    let total: f64 = candidates
        .iter()
        .zip(&ref_counts)
        .map(|(cand, refs)| {
            let (cand_vec, cand_norm, cand_len) = vector(&ngram_counts(cand));
            let mut sum = [0.0f64; MAX_N];
            for r in refs {
                let (ref_vec, ref_norm, ref_len) = vector(r);
                let delta = cand_len as f64 - ref_len as f64;
                let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
                for n in 0..MAX_N {
                    let mut val: f64 = cand_vec[n]
                        .iter()
                        .map(|(gram, &w)| {
                            let rw = ref_vec[n].get(gram).copied().unwrap_or(0.0);
                            w.min(rw) * rw
                        })
                        .sum();
                    if cand_norm[n] != 0.0 && ref_norm[n] != 0.0 {
                        val /= cand_norm[n] * ref_norm[n];
                    }
                    sum[n] += val * penalty;
                }
            }
            sum.iter().sum::<f64>() / MAX_N as f64 / refs.len() as f64 * 10.0
        })
        .sum();
    total / candidates.len() as f64
}

/// Per order, n-gram weights; per order, their norm; the bigram count.
type TfIdf<'a> = ([HashMap<&'a [String], f64>; MAX_N], [f64; MAX_N], usize);

/// pycocoevalcap's `counts2vec`: per order, the tf·idf weights of a caption's n-grams and
/// their norm, and the caption's bigram count (its "length" for the Gaussian penalty).
fn tfidf<'a>(
    counts: &HashMap<&'a [String], usize>,
    doc_freq: &HashMap<&'a [String], f64>,
    log_n: f64,
) -> TfIdf<'a> {
    let mut vec: [HashMap<&[String], f64>; MAX_N] = Default::default();
    let mut norm = [0.0f64; MAX_N];
    let mut bigrams = 0usize;
    for (&gram, &tf) in counts {
        let df = doc_freq.get(gram).copied().unwrap_or(0.0).max(1.0).ln();
        let weight = tf as f64 * (log_n - df);
        vec[gram.len() - 1].insert(gram, weight);
        norm[gram.len() - 1] += weight * weight;
        if gram.len() == 2 {
            bigrams += tf;
        }
    }
    (vec, norm.map(f64::sqrt), bigrams)
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Which image a prediction is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageKey {
    /// A COCO `image_id` (numbers and strings compare by their text).
    Id(String),
    /// An image path or file name.
    Path(String),
}

/// One predicted caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub image: ImageKey,
    pub caption: String,
}

/// Reference captions of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceImage {
    pub id: Option<String>,
    pub file_name: Option<String>,
    pub captions: Vec<String>,
}

/// Reference captions per image, with indexes to find an image by id, path or basename.
#[derive(Debug, Clone)]
pub struct References {
    pub images: Vec<ReferenceImage>,
    by_id: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    /// `None` where two images share a basename.
    by_basename: HashMap<String, Option<usize>>,
}

/// Reads predictions, references, pairs them and scores them: `zoo eval caption`.
///
/// The evaluated images are the predicted ones, as in pycocoevalcap's `COCOEvalCap` (which
/// evaluates `cocoRes.getImgIds()`); references of other images are ignored, also for the
/// CIDEr document frequencies.
pub fn evaluate_files(predictions: &Path, references: &Path) -> Result<CaptionScores> {
    let preds = load_predictions(predictions)?;
    let refs = load_references(references)?;
    let (candidates, reference_sets) = refs.pair(&preds, predictions, references)?;
    score_captions(&candidates, &reference_sets)
}

/// Reads predicted captions from JSON (a list of `{"image": PATH, "caption": TEXT}` as
/// `zoo caption --json` prints, or COCO results `{"image_id": ID, "caption": TEXT}`) or from a
/// CSV file with a header naming an `image` (or `image_id`, `filepath`, `file_name`) column and
/// a `caption` (or `title`) column. Fails, naming the file, on anything else or no rows.
pub fn load_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = read(path)?;
    let preds = if looks_like_json(&text) {
        let value = parse_json(path, &text)?;
        let Value::Array(items) = value else {
            return Err(invalid(path, "expected a JSON list of predictions"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let image = if let Some(id) = item.get("image_id") {
                    ImageKey::Id(id_text(id).ok_or_else(|| {
                        invalid(
                            path,
                            format!("prediction {i}: image_id is not a number or string"),
                        )
                    })?)
                } else if let Some(Value::String(p)) = item.get("image") {
                    ImageKey::Path(p.clone())
                } else {
                    return Err(invalid(
                        path,
                        format!("prediction {i} has no \"image\" or \"image_id\""),
                    ));
                };
                let Some(Value::String(caption)) = item.get("caption") else {
                    return Err(invalid(
                        path,
                        format!("prediction {i} has no string \"caption\""),
                    ));
                };
                Ok(Prediction {
                    image,
                    caption: caption.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        let (keys, rows) = csv_columns(path, &text)?;
        rows.into_iter()
            .map(|(image, caption)| Prediction {
                image: if keys.by_id {
                    ImageKey::Id(image)
                } else {
                    ImageKey::Path(image)
                },
                caption,
            })
            .collect()
    };
    if preds.is_empty() {
        return Err(invalid(path, "it lists no predictions"));
    }
    Ok(preds)
}

/// Reads reference captions from COCO captions JSON (`{"images": [{"id", "file_name"}],
/// "annotations": [{"image_id", "caption"}]}`; `images` may be left out when predictions name
/// images by id) or from a CSV file like [`load_predictions`]'s with one row per caption.
pub fn load_references(path: &Path) -> Result<References> {
    let text = read(path)?;
    let mut images: Vec<ReferenceImage> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    if looks_like_json(&text) {
        let value = parse_json(path, &text)?;
        let Some(Value::Array(annotations)) = value.get("annotations") else {
            return Err(invalid(
                path,
                "expected COCO captions JSON with an \"annotations\" list",
            ));
        };
        if let Some(list) = value.get("images") {
            let Value::Array(list) = list else {
                return Err(invalid(path, "\"images\" is not a list"));
            };
            for (i, img) in list.iter().enumerate() {
                let id = img.get("id").and_then(id_text).ok_or_else(|| {
                    invalid(path, format!("images[{i}] has no number or string \"id\""))
                })?;
                let file_name = img
                    .get("file_name")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                index.insert(id.clone(), images.len());
                images.push(ReferenceImage {
                    id: Some(id),
                    file_name,
                    captions: Vec::new(),
                });
            }
        }
        for (i, ann) in annotations.iter().enumerate() {
            let id = ann.get("image_id").and_then(id_text).ok_or_else(|| {
                invalid(
                    path,
                    format!("annotations[{i}] has no number or string \"image_id\""),
                )
            })?;
            let Some(caption) = ann.get("caption").and_then(Value::as_str) else {
                return Err(invalid(
                    path,
                    format!("annotations[{i}] has no string \"caption\""),
                ));
            };
            let slot = *index.entry(id.clone()).or_insert_with(|| {
                images.push(ReferenceImage {
                    id: Some(id),
                    file_name: None,
                    captions: Vec::new(),
                });
                images.len() - 1
            });
            images[slot].captions.push(caption.to_string());
        }
    } else {
        let (keys, rows) = csv_columns(path, &text)?;
        for (image, caption) in rows {
            let slot = *index.entry(image.clone()).or_insert_with(|| {
                let (id, file_name) = if keys.by_id {
                    (Some(image), None)
                } else {
                    (None, Some(image))
                };
                images.push(ReferenceImage {
                    id,
                    file_name,
                    captions: Vec::new(),
                });
                images.len() - 1
            });
            images[slot].captions.push(caption);
        }
    }
    if images.iter().all(|img| img.captions.is_empty()) {
        return Err(invalid(path, "it lists no reference captions"));
    }
    Ok(References::new(images))
}

impl References {
    pub fn new(images: Vec<ReferenceImage>) -> Self {
        let (mut by_id, mut by_name, mut by_basename) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        for (i, img) in images.iter().enumerate() {
            if let Some(id) = &img.id {
                by_id.insert(id.clone(), i);
            }
            if let Some(name) = &img.file_name {
                by_name.insert(name.clone(), i);
                by_basename
                    .entry(basename(name).to_string())
                    .and_modify(|slot| *slot = None)
                    .or_insert(Some(i));
            }
        }
        Self {
            images,
            by_id,
            by_name,
            by_basename,
        }
    }

    /// The image a prediction is for: by id, else by exact path, else by basename.
    fn find(&self, key: &ImageKey) -> std::result::Result<usize, String> {
        match key {
            ImageKey::Id(id) => self
                .by_id
                .get(id)
                .copied()
                .ok_or_else(|| format!("image_id {id}")),
            ImageKey::Path(p) => {
                if let Some(&i) = self.by_name.get(p) {
                    return Ok(i);
                }
                match self.by_basename.get(basename(p)) {
                    Some(Some(i)) => Ok(*i),
                    Some(None) => Err(format!(
                        "image {p:?} (several references share the file name {:?})",
                        basename(p)
                    )),
                    None => Err(format!("image {p:?}")),
                }
            }
        }
    }

    /// Pairs each prediction with its image's references: (candidates, reference sets). Fails,
    /// naming both files, if a prediction matches no image with captions, or two predictions
    /// are for the same image.
    pub fn pair(
        &self,
        predictions: &[Prediction],
        predictions_path: &Path,
        references_path: &Path,
    ) -> Result<(Vec<String>, Vec<Vec<String>>)> {
        let no_refs = |p: usize, what: &dyn std::fmt::Display| {
            invalid(
                predictions_path,
                format!(
                    "prediction {p}: {what} has no reference captions in {}",
                    references_path.display()
                ),
            )
        };
        let mut seen: HashMap<usize, usize> = HashMap::new();
        let mut candidates = Vec::with_capacity(predictions.len());
        let mut refs = Vec::with_capacity(predictions.len());
        for (p, pred) in predictions.iter().enumerate() {
            let i = self.find(&pred.image).map_err(|what| no_refs(p, &what))?;
            if self.images[i].captions.is_empty() {
                return Err(no_refs(p, &format!("{:?}", pred.image)));
            }
            if let Some(first) = seen.insert(i, p) {
                return Err(invalid(
                    predictions_path,
                    format!(
                        "predictions {first} and {p} are for the same image {:?}",
                        pred.image
                    ),
                ));
            }
            candidates.push(pred.caption.clone());
            refs.push(self.images[i].captions.clone());
        }
        Ok((candidates, refs))
    }
}

fn basename(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

fn read(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(invalid(path, "the file is empty"));
    }
    Ok(text)
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {message}", path.display()))
}

fn looks_like_json(text: &str) -> bool {
    text.trim_start_matches('\u{feff}')
        .trim_start()
        .starts_with(['[', '{'])
}

fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| invalid(path, format!("invalid JSON: {e}")))
}

/// An id as text: `42` and `"42"` are the same image.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Which CSV column names the image, and whether it holds ids rather than paths.
struct CsvKeys {
    by_id: bool,
}

const CSV_IMAGE_COLUMNS: [&str; 4] = ["image", "image_id", "filepath", "file_name"];
const CSV_CAPTION_COLUMNS: [&str; 2] = ["caption", "title"];

/// The (image, caption) rows of a CSV (or, for `.tsv` files, tab-separated) file with a header.
fn csv_columns(path: &Path, text: &str) -> Result<(CsvKeys, Vec<(String, String)>)> {
    let separator = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"))
    {
        '\t'
    } else {
        ','
    };
    let records = parse_csv(text.trim_start_matches('\u{feff}'), separator)
        .map_err(|(line, message)| invalid(path, format!("line {line}: {message}")))?;
    let Some((header, rows)) = records.split_first() else {
        return Err(invalid(path, "the file is empty"));
    };
    let column = |names: &[&str]| {
        header.1.iter().position(|h| names.contains(&h.trim())).ok_or_else(|| {
            invalid(
                path,
                format!("line 1: expected JSON, or a CSV header with one of the columns {names:?} (it has {:?})", header.1),
            )
        })
    };
    let (img, cap) = (column(&CSV_IMAGE_COLUMNS)?, column(&CSV_CAPTION_COLUMNS)?);
    let by_id = header.1[img].trim() == "image_id";
    let rows = rows
        .iter()
        .map(|(line, fields)| match (fields.get(img), fields.get(cap)) {
            (Some(i), Some(c)) => Ok((i.clone(), c.clone())),
            _ => Err(invalid(
                path,
                format!(
                    "line {line}: expected {} fields, found {}",
                    header.1.len(),
                    fields.len()
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((CsvKeys { by_id }, rows))
}

/// A CSV record: its line number and fields.
type CsvRecord = (usize, Vec<String>);

/// Parses CSV (RFC 4180: fields may be quoted, `""` is a quote inside quotes, quoted fields may
/// span lines) into (line number, fields) records, skipping blank lines.
fn parse_csv(text: &str, separator: char) -> std::result::Result<Vec<CsvRecord>, (usize, String)> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let (mut line, mut record_line) = (1usize, 1usize);
    let (mut quoted, mut was_quoted) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => {
                    line += usize::from(c == '\n');
                    field.push(c);
                }
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !was_quoted => (quoted, was_quoted) = (true, true),
            '"' => return Err((line, "a quote inside an unquoted field".into())),
            c if c == separator => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            '\r' => {}
            '\n' => {
                if !fields.is_empty() || !field.is_empty() || was_quoted {
                    fields.push(std::mem::take(&mut field));
                    records.push((record_line, std::mem::take(&mut fields)));
                }
                was_quoted = false;
                line += 1;
                record_line = line;
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err((record_line, "a quoted field is not closed".into()));
    }
    if !fields.is_empty() || !field.is_empty() || was_quoted {
        fields.push(field);
        records.push((record_line, fields));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        ptb_tokenize(s)
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn tokenizer_lowercases_and_drops_punctuation() {
        assert_eq!(
            toks("A man, riding a horse!"),
            words("a man riding a horse")
        );
        assert_eq!(
            toks("Two dogs; one cat: 'quoted' \"text\"."),
            words("two dogs one cat quoted text")
        );
        assert_eq!(
            toks("wait -- what - now... really?"),
            words("wait what now really")
        );
    }

    #[test]
    fn tokenizer_splits_clitics_like_ptb() {
        assert_eq!(
            toks("A man's dog isn't running."),
            words("a man 's dog is n't running")
        );
        assert_eq!(
            toks("I can't, won't; cannot"),
            words("i ca n't wo n't can not")
        );
        assert_eq!(
            toks("we're they've I'll he'd I'M DON'T"),
            words("we 're they 've i 'll he 'd i 'm do n't")
        );
        assert_eq!(
            toks("wouldn't've gonna 80's 'em dogs' o'clock"),
            words("would n't 've gon na 80 's 'em dogs o'clock")
        );
    }

    #[test]
    fn tokenizer_keeps_numbers_abbreviations_and_brackets() {
        assert_eq!(
            toks("It's 3.5 feet, 1,000 at 10:30."),
            words("it 's 3.5 feet 1,000 at 10:30")
        );
        assert_eq!(
            toks("Mr. Smith and e.g. the u.s.a. flag etc."),
            words("mr. smith and e.g. the u.s.a. flag etc.")
        );
        assert_eq!(toks("approx. 5. no. 5"), words("approx 5 no. 5"));
        assert_eq!(
            toks("a cat (black) [x] {y}"),
            words("a cat -lrb- black -rrb- -lsb- x -rsb- -lcb- y -rcb-")
        );
        assert_eq!(
            toks("$5 50% x*y a/b well-known £3"),
            words("$ 5 50 % x * y a/b well-known # 3")
        );
        assert_eq!(toks("wow!! huh?? ok?!"), words("wow !! huh ?? ok ?!"));
        assert_eq!(
            toks("“smart” ‘quotes’ – dash… 😀"),
            words("smart quotes dash")
        );
    }

    #[test]
    fn bleu_is_one_for_an_exact_match_and_penalizes_brevity() {
        let refs = vec![vec![words("a b c d e")]];
        let exact = bleu(&[words("a b c d e")], &refs);
        for s in exact {
            assert!((s - 1.0).abs() < 1e-8, "{exact:?}");
        }
        let short = bleu(&[words("a b c d")], &refs);
        assert!(
            (short[0] - (1.0f64 - 5.0 / 4.0).exp()).abs() < 1e-8,
            "{short:?}"
        );
    }

    #[test]
    fn cider_is_zero_without_overlap() {
        let refs = vec![vec![words("a b c")], vec![words("d e f")]];
        assert_eq!(cider_d(&[words("x y z"), words("u v w")], &refs), 0.0);
    }

    #[test]
    fn csv_parser_handles_quotes_and_blank_lines() {
        let rows = parse_csv(
            "image,caption\n\"a.jpg\",\"x, \"\"y\"\"\"\n\nb.jpg,z\n",
            ',',
        )
        .unwrap();
        assert_eq!(
            rows[1],
            (2, vec!["a.jpg".to_string(), "x, \"y\"".to_string()])
        );
        assert_eq!(rows[2], (4, vec!["b.jpg".to_string(), "z".to_string()]));
    }
}
