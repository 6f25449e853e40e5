// The page: MediaPipe Tasks for Web's ImageClassifier runs model.tflite (the very file a
// phone app ships, with its metadata and labels) on the CPU, from this page's own origin.
// After the model loads, and after each classification, window.convmixer says so:
// {ready: true, lastResult: {top: [{index, name, score}, ...], ms}}, or {error}.
import { FilesetResolver, ImageClassifier } from "./mediapipe/vision_bundle.mjs";

const state = { ready: false, lastResult: null, error: null };
window.convmixer = state;
const $ = (id) => document.getElementById(id);
let classifier = null;

async function start() {
  const config = await (await fetch("config.json")).json();
  $("model").textContent = `${config.name}: ${config.classes} classes, ${config.size} px (${config.file})`;
  document.title = `${config.name} in your browser`;
  // The CPU delegate: the GPU one needs a real GPU (software WebGL gives wrong scores).
  const wasm = new URL("mediapipe/wasm", document.baseURI).href;
  classifier = await ImageClassifier.createFromOptions(await FilesetResolver.forVisionTasks(wasm), {
    baseOptions: { modelAssetPath: "model.tflite", delegate: "CPU" },
    runningMode: "IMAGE",
    maxResults: 5,
  });
  state.ready = true;
  document.body.classList.add("ready");
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
    $("camera-on").hidden = false;  // a secure context only: localhost, or https
  }
}

function classify(source) {
  const started = performance.now();
  const result = classifier.classify(source);
  const ms = performance.now() - started;
  const top = result.classifications[0].categories.map((c) => ({
    index: c.index,
    name: c.categoryName || c.displayName || `class ${c.index}`,
    score: c.score,
  }));
  state.lastResult = { top, ms };
  show(top, ms);
}

function show(top, ms) {
  const list = $("top");
  list.replaceChildren(...top.map(({ name, score }) => {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;  // text, never markup: a class name is outside text
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = `${(100 * score).toFixed(1)}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    item.append(label, value, bar);
    return item;
  }));
  $("timing").textContent = `classified in ${ms.toFixed(1)} ms on this device`;
}

async function showImage(file) {
  if (!file || !classifier) return;
  const image = $("preview");
  image.src = URL.createObjectURL(file);
  await image.decode();
  image.hidden = false;
  $("frame").hidden = true;
  $("hint").hidden = true;
  classify(image);
}

async function cameraOn() {
  const video = $("camera");
  video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  await video.play();
  video.hidden = false;
  $("preview").hidden = true;
  $("hint").hidden = true;
  $("snap").hidden = false;
}

function snap() {
  const video = $("camera");
  const frame = $("frame");
  frame.width = video.videoWidth;
  frame.height = video.videoHeight;
  frame.getContext("2d").drawImage(video, 0, 0);
  frame.hidden = false;
  classify(frame);
}

$("file").addEventListener("change", (event) => showImage(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  showImage(event.dataTransfer.files[0]);
});
$("camera-on").addEventListener("click", () => cameraOn().catch((err) => fail(err)));
$("snap").addEventListener("click", snap);

function fail(err) {
  state.error = String(err);
  $("model").textContent = `Cannot run the model: ${err}`;
  document.body.classList.add("failed");
}

start().catch(fail);
