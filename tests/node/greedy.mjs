// Greedy text from a keraslm export's assets.extra/model.onnx, with ONNX Runtime for Node.js.
//
//   node greedy.mjs VERSION_DIR PROMPT NUM_TOKENS
//
// prints what `python sample.py VERSION_DIR --greedy --prompt PROMPT --num-tokens NUM_TOKENS`
// prints: the prompt and its continuation. It is a deploy machine's client in another language,
// with no Python: keraslm.json gives the vocabulary and the state names, model.onnx the step.
// The rules it follows are keraslm/vocab.py's (encode, decode, join) and keraslm/sampling.py's
// (greedy: argmax, ties to the lowest id). Errors print one line and exit 2, as sample.py does.

import { readFileSync } from "node:fs";
import { join } from "node:path";

import ort from "onnxruntime-node";

const UNK = "<unk>";
const EOS = "<eos>";

class UsageError extends Error {}

// Python's str.isspace() characters: JavaScript's \s differs (it has U+FEFF, lacks U+001C-U+001F and U+0085).
const PYTHON_SPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;

// keraslm.vocab.words: whitespace split, <eos> for every newline (none after the last line).
function words(text) {
  const lines = text.split("\n");
  const out = [];
  lines.forEach((line, i) => {
    out.push(...line.split(PYTHON_SPACE).filter((w) => w !== ""));
    if (i < lines.length - 1) out.push(EOS);
  });
  return out;
}

// keraslm.vocab.Vocabulary.encode_prompt, but an empty prompt with no start token is refused: the
// random first token sample.py would draw comes from NumPy's generator, which this client lacks.
function encodePrompt(vocabulary, prompt) {
  const index = new Map(vocabulary.tokens.map((t, i) => [t, i]));
  if (prompt === "") {
    const start = vocabulary.level === "word" ? EOS : "\n";
    if (!index.has(start)) throw new UsageError("the vocabulary has no start token: give a prompt");
    return [index.get(start)];
  }
  if (vocabulary.level === "word") return words(prompt).map((w) => index.get(w) ?? index.get(UNK));
  const chars = Array.from(prompt); // code points, as Python's list(str)
  const unknown = [...new Set(chars.filter((c) => !index.has(c)))].sort();
  if (unknown.length) throw new UsageError(`characters not in the vocabulary: ${unknown.map((c) => JSON.stringify(c)).join(", ")}`);
  return chars.map((c) => index.get(c));
}

// keraslm.vocab.Vocabulary.decode: characters joined, or words joined by spaces with <eos> a newline.
function decode(vocabulary, ids) {
  const tokens = ids.map((i) => vocabulary.tokens[i]);
  if (vocabulary.level === "char") return tokens.join("");
  let text = "";
  let line = [];
  for (const t of tokens) {
    if (t === EOS) {
      text += line.join(" ") + "\n";
      line = [];
    } else line.push(t);
  }
  return text + line.join(" ");
}

// keraslm.vocab.Vocabulary.join: a space between words unless the prompt ends in one.
function joinText(vocabulary, prompt, continuation) {
  const needsSpace = vocabulary.level === "word" && prompt && continuation && !/[\n ]$/.test(prompt);
  return needsSpace ? `${prompt} ${continuation}` : prompt + continuation;
}

// The id of the largest of the last position's logits; the first of equal ones, as NumPy's argmax.
function argmaxLast(logits) {
  const [, length, size] = logits.dims;
  const row = logits.data.subarray((length - 1) * size, length * size);
  let best = 0;
  for (let i = 0; i < size; i++) {
    if (!Number.isFinite(row[i])) throw new UsageError("model.onnx returned NaN or infinite logits; export again");
    if (row[i] > row[best]) best = i;
  }
  return best;
}

// One step: tokens [1, T] from `state` ({input name: tensor}); the logits and the state after.
async function step(session, states, ids, state) {
  const tokens = new ort.Tensor("int32", Int32Array.from(ids), [1, ids.length]);
  const out = await session.run({ tokens, ...state });
  return [out.logits, Object.fromEntries(states.map((s) => [s.input, out[s.output]]))];
}

async function greedy(versionDir, prompt, numTokens) {
  const extra = join(versionDir, "assets.extra");
  const description = JSON.parse(readFileSync(join(extra, "keraslm.json"), "utf-8"));
  const { vocabulary, states } = description;
  const ids = encodePrompt(vocabulary, prompt);
  const session = await ort.InferenceSession.create(join(extra, "model.onnx"));
  // Zero state: [1, H] for each state keraslm.json names.
  let state = Object.fromEntries(
    states.map((s) => [s.input, new ort.Tensor("float32", new Float32Array(s.shape[1]), [1, s.shape[1]])]),
  );
  let logits;
  [logits, state] = await step(session, states, ids, state); // the whole prompt in one call
  const continuation = [];
  for (let t = 0; t < numTokens; t++) {
    continuation.push(argmaxLast(logits));
    if (t + 1 < numTokens) [logits, state] = await step(session, states, continuation.slice(-1), state);
  }
  const shown = prompt === "" ? decode(vocabulary, ids) : prompt;
  return joinText(vocabulary, shown, decode(vocabulary, continuation));
}

async function main(argv) {
  if (argv.length !== 3) throw new UsageError("usage: node greedy.mjs VERSION_DIR PROMPT NUM_TOKENS");
  const [versionDir, prompt, count] = argv;
  const numTokens = Number(count);
  if (!Number.isInteger(numTokens) || numTokens <= 0) throw new UsageError(`NUM_TOKENS must be positive, got ${count}`);
  process.stdout.write((await greedy(versionDir, prompt, numTokens)) + "\n");
}

main(process.argv.slice(2)).catch((e) => {
  console.error(`error: ${e.message.split("\n")[0]}`);
  process.exit(2);
});
