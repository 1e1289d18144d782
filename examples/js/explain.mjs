// camserve from JavaScript with fetch (browsers, Node 18+, Deno):
//   node explain.mjs http://localhost:8080 imagenet path/to/cat.jpg
// In a browser, take the Blob from an <input type=file> instead of readFile.
import { readFile, writeFile } from "node:fs/promises";

const [url = "http://localhost:8080", model = "imagenet", image = "cat.jpg"] = process.argv.slice(2);

async function explain(blob, options = {}) {
  const form = new FormData();
  form.append("image", blob, "image");
  form.append("options", JSON.stringify({ methods: ["gradcam", "guided_gradcam"], ...options }));
  const res = await fetch(`${url}/v1/models/${model}/explain`, { method: "POST", body: form });
  const body = await res.json();
  if (!res.ok) throw new Error(`${body.status} ${body.title}: ${body.detail}`); // RFC 9457 problem
  return body;
}

const blob = new Blob([await readFile(image)], { type: "image/jpeg" });
const result = await explain(blob, { top_k: 2 });
const top = result.predictions[0];
console.log(`${top.label ?? top.index} (${top.score.toFixed(3)}), ${result.explanations.length} explanations in ${result.timings_ms.total} ms`);
for (const e of result.explanations) {
  await writeFile(`${e.method}_${e.target.index}_overlay.png`, Buffer.from(e.overlay_png, "base64"));
}
// In a page: img.src = "data:image/png;base64," + result.explanations[0].overlay_png;
