// The demo page end to end in headless Chromium: load it from a real camserve, upload a real photo (a camera
// JPEG) and then one of the demo model's own pictures, wait for the heatmaps, check they rendered (canvas
// pixels not blank), click another class, check the explanations follow it, try the keyboard path, and save
// screenshots (desktop and phone-sized) in the given folder. Run by scripts/browser-test.sh:
// Then the bundled detector on one of its held-out scenes: boxes drawn on the picture, clicking a box explains that
// box, the boxes and the map overlay toggle. Then the bundled segmenter on one of its scenes: the label map over the
// picture with a legend, clicking a class explains it, dragging draws a region explained with HiResCAM.
// Then the bundled embedder: the picture and a reference picture, both explained, with their similarity.
// Then the bundled multi-label classifier on a scene: its sigmoid scores, every class at or above the threshold
// explained, and a higher threshold explaining fewer.
//   node page.mjs URL PICTURE OUT_DIR [REAL_PHOTO [SCENE [SEGMENTATION_SCENE [REFERENCE_PICTURE [MULTILABEL_SCENE]]]]]
import { chromium } from "playwright-core";
import { strict as assert } from "node:assert";

const [url, photo, outDir, realPhoto, scene, segScene, refPicture, multiScene] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
await page.goto(url);
await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0);

// Upload a picture through the file input; the default methods come back and their canvases hold real
// pictures: many distinct colours, not a blank or uniform image.
async function uploadAndCheck(file) {
  await page.evaluate(() => { document.getElementById("status").textContent = ""; });
  await page.setInputFiles("#file", file);
  await page.waitForSelector(".card canvas", { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
  const cards = await page.$$eval(".card h3 span", (s) => s.map((x) => x.textContent));
  assert.deepEqual(cards, ["gradcam", "guided_gradcam"], "the default methods");
  const variety = await page.$$eval(".card canvas", (cs) => cs.map((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    const colours = new Set();
    for (let i = 0; i < d.length; i += 16) colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    return { w: c.width, h: c.height, colours: colours.size };
  }));
  for (const v of variety) {
    assert.ok(v.w > 0 && v.h > 0, "canvas has a size");
    assert.ok(v.colours > 20, `canvas is not blank (${v.colours} colours)`);
  }
  return cards;
}
// The page opens on the first configured model, the ImageNet classifier; the real photo is a cat to it.
assert.equal(await page.$eval("#model", (s) => s.value), "imagenet", "the page opens on the ImageNet model");
if (realPhoto) {
  await uploadAndCheck(realPhoto);
  const top = await page.$eval(".preds li button span", (s) => s.textContent);
  assert.match(top, /^(Egyptian cat|tabby|tiger cat)/, "the cat photo is a cat");
  await page.screenshot({ path: `${outDir}/page-photo.png`, fullPage: true });
}
// The page crops its copy of the photo as the server does (Resize 256 + CenterCrop 224 for the ImageNet model):
// chelsea.jpg (451x300) becomes 384x256, cropped at (80, 16), i.e. (93.96, 18.75) and 263.1 x 262.5 photo pixels.
const box = await page.evaluate(() => cropBox(state.models.find((m) => m.name === "imagenet"), 451, 300));
const want = [80 * 451 / 384, 16 * 300 / 256, 224 * 451 / 384, 224 * 300 / 256];
box.forEach((v, i) => assert.ok(Math.abs(v - want[i]) < 1e-9, `crop box ${box} vs ${want}`));
// The rest with a picture of the demo model's task, where its explanations mean something.
await page.selectOption("#model", "demo");
const cards = await uploadAndCheck(photo);
const first = await page.$eval(".card h3 small", (s) => s.textContent);
assert.equal(await page.$eval("#dettoggles", (e) => getComputedStyle(e).display), "none", "a classifier's page has no box toggles");
await page.screenshot({ path: `${outDir}/page.png`, fullPage: true });

// Click the second class of the bar chart: every explanation now targets it.
const buttons = await page.$$(".preds li button");
assert.ok(buttons.length >= 2, "a list of predictions");
const second = await buttons[1].evaluate((b) => b.querySelector("span").textContent);
await buttons[1].click();
await page.waitForFunction((label) => [...document.querySelectorAll(".card h3 small")].every((s) => s.textContent.startsWith(label)), second, { timeout: 60000 });
// The list is redrawn: the pressed button is now the second one.
assert.equal(await page.$eval(".preds li:nth-child(2) button", (b) => b.getAttribute("aria-pressed")), "true");
const now = await page.$eval(".card h3 small", (s) => s.textContent);
assert.notEqual(now, first, "the explanation changed with the class");
await page.screenshot({ path: `${outDir}/page-second-class.png`, fullPage: true });

// Keyboard: reach the methods and the Explain button with Tab, pick LayerCAM, press Enter.
await page.check('#methods input[value="layercam"]');
await page.focus("#go");
await page.keyboard.press("Enter");
await page.waitForFunction(() => [...document.querySelectorAll(".card h3 span")].some((s) => s.textContent === "layercam"), null, { timeout: 60000 });

// Faithfulness: tick deletion and insertion; each card shows both scores, in [0, 1].
await page.check('#metrics input[value="deletion"]');
await page.check('#metrics input[value="insertion"]');
await page.click("#go");
await page.waitForFunction(() => document.querySelectorAll('.card dd[data-metric="insertion"]').length > 0, null, { timeout: 120000 });
const scores = await page.$$eval(".card dd[data-metric]", (dds) => dds.map((d) => [d.dataset.metric, Number(d.textContent)]));
const cardCount = await page.$$eval(".card", (c) => c.length);
assert.equal(scores.length, 2 * cardCount, "deletion and insertion on every card");
assert.ok(scores.every(([, v]) => v >= 0 && v <= 1), `metric values in [0, 1]: ${JSON.stringify(scores)}`);
await page.uncheck('#metrics input[value="deletion"]');
await page.uncheck('#metrics input[value="insertion"]');

// A phone-sized screen: one column, nothing wider than the viewport.
await page.setViewportSize({ width: 390, height: 844 });
const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
assert.ok(overflow <= 1, `no horizontal scrolling on a phone (overflow ${overflow}px)`);
await page.screenshot({ path: `${outDir}/page-phone.png`, fullPage: false });

// Errors are shown as the server phrased them.
await page.setViewportSize({ width: 1280, height: 900 });
await page.evaluate(() => { document.getElementById("layer").add(new Option("no/such/layer", "no/such/layer", true, true)); });
await page.click("#go");
await page.waitForFunction(() => document.getElementById("status").className === "error");
const msg = await page.$eval("#status", (s) => s.textContent);
assert.match(msg, /Unprocessable Entity: unknown layer `no\/such\/layer`/);

// The detector: its default method (HiResCAM) is ticked, the scene's detections are boxes on the picture, and the
// first explanation is of the best one (#0).
let detected = "";
if (scene) {
  await page.selectOption("#model", "shapes");
  const ticked = await page.$$eval("#methods input:checked", (cs) => cs.map((c) => c.value));
  assert.deepEqual(ticked, ["hirescam"], "a detector's default method");
  await page.evaluate(() => { document.getElementById("status").textContent = ""; });
  await page.setInputFiles("#file", scene);
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
  const boxes = await page.$$eval("#detboxes button", (bs) => bs.map((b) => ({ index: Number(b.dataset.detection), label: b.textContent, pressed: b.getAttribute("aria-pressed"), w: b.getBoundingClientRect().width, h: b.getBoundingClientRect().height })).sort((a, b) => a.index - b.index));
  assert.ok(boxes.length >= 2, `at least two boxes drawn (${JSON.stringify(boxes)})`);
  assert.deepEqual(boxes.map((b) => b.pressed === "true"), boxes.map((b) => b.index === 0), "the best detection is the one explained");
  assert.ok(boxes.every((b) => b.w > 4 && b.h > 4), `boxes have a size on screen: ${JSON.stringify(boxes)}`);
  assert.match(await page.$eval(".card h3 small", (s) => s.textContent), / #0 · /, "the card explains detection 0");
  await page.screenshot({ path: `${outDir}/page-detector.png`, fullPage: true });
  // Click another box, one whose centre is not under another box (a mouse cannot reach a box hidden under a
  // smaller one there; the list below the picture reaches every detection): the explanation follows it, and that
  // box is now the pressed one.
  const target = await page.$$eval("#detboxes button", (bs) => {
    const free = bs.filter((b) => {
      const r = b.getBoundingClientRect();
      const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
      return b.dataset.detection !== "0" && (hit === b || b.contains(hit));
    });
    return free.length ? Number(free[0].dataset.detection) : -1;
  });
  assert.ok(target > 0, "another box can be clicked");
  await page.click(`#detboxes button[data-detection="${target}"]`);
  await page.waitForFunction((t) => [...document.querySelectorAll(".card h3 small")].every((s) => s.textContent.includes(` #${t} · `)), target, { timeout: 60000 });
  assert.equal(await page.$eval(`#detboxes button[data-detection="${target}"]`, (b) => b.getAttribute("aria-pressed")), "true");
  const map = await page.$eval("#detmap", (m) => m.src.length);
  assert.ok(map > 1000, "the map overlay holds the explanation");
  // The toggles: the map starts hidden and the boxes shown; boxes off, map on. What is checked is what is on screen.
  const shown = (sel) => page.$eval(sel, (e) => e.getBoundingClientRect().width > 0 && getComputedStyle(e).display !== "none");
  assert.deepEqual([await shown("#detmap"), await shown("#detboxes"), await shown("#detimg")], [false, true, true], "picture and boxes, no map");
  await page.uncheck("#showboxes");
  assert.equal(await shown("#detboxes"), false, "boxes hidden");
  await page.check("#showmap");
  assert.equal(await shown("#detmap"), true, "map overlay shown");
  await page.check("#showboxes");
  assert.equal(await shown("#detboxes"), true, "boxes back");
  await page.selectOption("#model", "demo");
  assert.deepEqual([await shown("#dets"), await shown("#dettoggles")], [false, false], "a classifier has no boxes nor their toggles");
  await page.selectOption("#model", "shapes");
  await page.screenshot({ path: `${outDir}/page-detector-second.png`, fullPage: true });
  detected = `; detector: ${boxes.length} boxes, clicked ${boxes.find((b) => b.index === target).label}`;
}

// The segmenter: Grad-CAM by default; the label map lies over the picture, the legend lists its classes with their
// colours; clicking another class explains it; dragging on the picture draws a region, explained with HiResCAM.
let segmented = "";
if (segScene) {
  await page.selectOption("#model", "segmenter");
  assert.deepEqual(await page.$$eval("#methods input:checked", (cs) => cs.map((c) => c.value)), ["gradcam"], "a segmenter's default method");
  await page.evaluate(() => { document.getElementById("status").textContent = ""; });
  await page.setInputFiles("#file", segScene);
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
  const shown = (sel) => page.$eval(sel, (e) => e.getBoundingClientRect().width > 0 && getComputedStyle(e).display !== "none");
  assert.deepEqual([await shown("#segmap"), await shown("#detimg"), await page.$$eval("#detboxes button", (b) => b.length)], [true, true, 0], "the label map over the picture, no boxes");
  assert.ok(await page.$eval("#segmap", (m) => m.naturalWidth) > 0, "the label map PNG decodes");
  const legend = await page.$$eval("#preds li button", (bs) => bs.map((b) => ({ name: b.children[0].textContent, swatch: !!b.querySelector(".swatch"), pressed: b.getAttribute("aria-pressed") })));
  assert.ok(legend.length >= 2 && legend.every((l) => l.swatch), `a legend with colours: ${JSON.stringify(legend)}`);
  const explained = await page.$eval(".card h3 small", (s) => s.textContent);
  assert.ok(!explained.startsWith("background"), `the default target is not the background: ${explained}`);
  const shown2 = shown;
  // A region: drag across the picture's top-left quarter (around one of the scene's two triangles).
  const r = await page.$eval("#detimg", (i) => { i.scrollIntoView(); const b = i.getBoundingClientRect(); return { x: b.left, y: b.top, w: b.width, h: b.height }; });
  await page.mouse.move(r.x + r.w * 0.03, r.y + r.h * 0.03);
  await page.mouse.down();
  await page.mouse.move(r.x + r.w * 0.25, r.y + r.h * 0.25, { steps: 5 });
  await page.mouse.move(r.x + r.w * 0.5, r.y + r.h * 0.5, { steps: 5 });
  await page.mouse.up();
  await page.waitForFunction(() => document.querySelector(".card h3 span")?.textContent === "hirescam" && document.querySelector(".card h3 small")?.textContent.includes("in the region"), null, { timeout: 60000 })
    .catch(async (e) => { throw new Error(`${e}: status "${await page.$eval("#status", (s) => s.textContent)}", card "${await page.$eval(".card h3", (s) => s.textContent)}"`); });
  assert.equal(await shown2("#region"), true, "the region is drawn");
  assert.deepEqual(await page.$$eval("#methods input:checked", (cs) => cs.map((c) => c.value)), ["hirescam"], "a region switches to a method that follows it");
  assert.ok((await page.$eval(".card h3 small", (s) => s.textContent)).startsWith(explained.split(" · ")[0]), "the same class, now in the region");
  await page.screenshot({ path: `${outDir}/page-segmenter-region.png`, fullPage: true });
  // Another class from the legend: explained in the same region.
  const other = legend.find((l) => l.pressed !== "true" && l.name !== "background");
  assert.ok(other, `another class to click: ${JSON.stringify(legend)}`);
  await page.click(`#preds li button:has-text("${other.name}")`);
  await page.waitForFunction((n) => document.querySelector(".card h3 small")?.textContent.startsWith(`${n} in the region`), other.name, { timeout: 60000 });
  await page.screenshot({ path: `${outDir}/page-segmenter.png`, fullPage: true });
  segmented = `; segmenter: ${legend.length} classes, a region, then ${other.name} in it`;
}

// The embedder: without a reference the page asks for one; with one, both pictures are explained (each card on its
// own picture) and the similarity is shown.
let embedded = "";
if (refPicture) {
  await page.selectOption("#model", "embedder");
  assert.equal(await page.$eval("#refbox", (b) => b.hidden), false, "the reference picker shows for an embedder");
  await page.evaluate(() => { document.getElementById("status").textContent = ""; });
  await page.setInputFiles("#file", photo);
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("choose a reference image"), null, { timeout: 60000 });
  await page.setInputFiles("#reffile", refPicture);
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
  const titles = await page.$$eval(".card h3 small", (ss) => ss.map((s) => s.textContent));
  assert.equal(titles.length, 2, `the picture and its reference: ${JSON.stringify(titles)}`);
  assert.ok(titles[0].startsWith("the image, against the reference · similarity") && titles[1].startsWith("the reference, against the image"), JSON.stringify(titles));
  const similarity = await page.$eval("#preds-title", (t) => t.textContent);
  assert.match(similarity, /^Similarity to the reference: -?[0-9.]+/);
  const distinct = await page.$$eval(".card .views canvas", (cs) => cs.map((c) => new Set(Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 0))).size));
  assert.ok(distinct.every((n) => n > 8), `rendered maps: ${distinct}`);
  await page.screenshot({ path: `${outDir}/page-embedder.png`, fullPage: true });
  embedded = `; embedder: ${similarity}`;
}

// The multi-label classifier: the threshold control shows; every class scoring at least 0.5 is marked and explained
// (one card per class and method); raising the threshold above all but the best explains only it.
let multi = "";
if (multiScene) {
  await page.selectOption("#model", "multilabel");
  assert.equal(await page.$eval("#threshold-label", (l) => l.hidden), false, "the threshold control shows for a multi-label classifier");
  await page.evaluate(() => { document.getElementById("status").textContent = ""; });
  await page.setInputFiles("#file", multiScene);
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
  const scores = await page.$$eval("#preds li button", (bs) => bs.map((b) => ({ name: b.children[0].textContent, score: parseFloat(b.children[2].textContent) / 100, pressed: b.getAttribute("aria-pressed") === "true" })));
  const above = scores.filter((p) => p.score >= 0.5);
  assert.ok(above.length >= 2, `a scene with two classes or more at 0.5: ${JSON.stringify(scores)}`);
  assert.deepEqual(scores.filter((p) => p.pressed).map((p) => p.name), above.map((p) => p.name), "the classes at or above the threshold are marked");
  const methods = (await page.$$eval("#methods input:checked", (cs) => cs.length));
  const explained = await page.$$eval(".card h3 small", (ss) => ss.map((s) => s.textContent.split(" · ")[0]));
  assert.equal(explained.length, above.length * methods, `one card per class and method: ${JSON.stringify(explained)}`);
  assert.deepEqual([...new Set(explained)].sort(), above.map((p) => p.name).sort(), "the explained classes are those at or above the threshold");
  assert.match(await page.$eval("#preds-title", (t) => t.textContent), /^Sigmoid scores: the classes at or above 0.5 are explained/);
  await page.screenshot({ path: `${outDir}/page-multilabel.png`, fullPage: true });
  // A threshold between the best score and the second: only the best is explained.
  const t = (above[0].score + above[1].score) / 2;
  await page.evaluate(() => { document.getElementById("status").textContent = ""; });
  await page.fill("#threshold", t.toFixed(3));
  await page.dispatchEvent("#threshold", "change");
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
  const now = await page.$$eval(".card h3 small", (ss) => [...new Set(ss.map((s) => s.textContent.split(" · ")[0]))]);
  assert.deepEqual(now, [above[0].name], `a higher threshold explains fewer classes: ${JSON.stringify(now)}`);
  multi = `; multilabel: ${above.map((p) => p.name).join(", ")} at 0.5, ${now[0]} at ${t.toFixed(3)}`;
}

// Jobs: a Score-CAM on the demo model run as a job (the box ticked) to the end; then RISE on the ImageNet model, whose
// 4,000 masks are estimated far over 3 s so the page makes it a job by itself, cancelled from its Cancel button.
const jobRequests = [];
page.on("request", (r) => { if (r.url().includes("async=true") || r.url().includes("/v1/jobs/")) jobRequests.push(`${r.method()} ${new URL(r.url()).pathname}`); });
await page.selectOption("#model", "demo");
await page.setInputFiles("#file", photo);
await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
await page.$$eval("#methods input", (cs) => cs.forEach((c) => { c.checked = c.value === "scorecam"; }));
await page.check("#asjob");
await page.evaluate(() => { document.getElementById("status").textContent = ""; });
// (The multi-label part left a threshold such as 0.712 in its box: the form must still submit.)
assert.equal(await page.$eval("form", (f) => f.checkValidity()), true, "the form is valid whatever threshold was typed");
await page.click("#go");
await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 120000 })
  .catch(async (e) => { throw new Error(`${e}: status "${await page.$eval("#status", (s) => s.textContent)}", requests ${jobRequests}, methods ${await page.$$eval("#methods input:checked", (cs) => cs.map((c) => c.value))}`); });
assert.deepEqual(await page.$$eval(".card h3 span", (s) => s.map((x) => x.textContent)), ["scorecam"], "the job's answer is drawn");
assert.ok(jobRequests.some((r) => r.startsWith("POST /v1/models/demo/explain")) && jobRequests.some((r) => r.startsWith("GET /v1/jobs/")), `a job was polled: ${jobRequests}`);
assert.equal(await page.$eval("#job", (e) => e.hidden), true, "the progress bar goes once the job is done");
await page.uncheck("#asjob");
await page.selectOption("#model", "imagenet");
await page.setInputFiles("#file", realPhoto || photo);
await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Explained"), null, { timeout: 60000 });
const riseEstimate = await page.evaluate(() => currentModel().estimates.rise);
assert.ok(riseEstimate > 3, `RISE's estimate on the ImageNet model is over 3 s: ${riseEstimate}`);
await page.$$eval("#methods input", (cs) => cs.forEach((c) => { c.checked = c.value === "rise"; }));
await page.click("#go");
await page.waitForFunction(() => !document.getElementById("job").hidden && document.getElementById("jobbar").value > 0, null, { timeout: 60000 });
await page.screenshot({ path: `${outDir}/page-job.png`, fullPage: true });
const progressText = await page.$eval("#jobtext", (e) => e.textContent);
await page.click("#cancel");
await page.waitForFunction(() => document.getElementById("status").textContent === "Cancelled.", null, { timeout: 30000 });
assert.ok(jobRequests.some((r) => r.startsWith("DELETE /v1/jobs/")), "the Cancel button deletes the job");
const jobs = `; jobs: scorecam to the end, rise cancelled at "${progressText}"`;

assert.deepEqual(errors, [], "no JavaScript errors");
await browser.close();
console.log(`browser test passed: ${cards.join(", ")}; first target ${first}, then ${now}${detected}${segmented}${embedded}${multi}${jobs}; screenshots in ${outDir}`);
