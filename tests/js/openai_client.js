const OpenAI = require('openai');
const [baseURL, key] = process.argv.slice(2);
const client = new OpenAI({ apiKey: key, baseURL: baseURL + '/v1', maxRetries: 0 });
const prompt = 'a red circle on a blue background';

(async () => {
  const out = {};
  const b64 = await client.images.generate({ prompt, size: '256x256', n: 2, response_format: 'b64_json',
                                             output_format: 'png', seed: 3, steps: 2 });
  out.b64 = b64.data.map((d) => Buffer.from(d.b64_json, 'base64').subarray(1, 4).toString());
  const url = await client.images.generate({ prompt, size: '256x256', output_format: 'webp', seed: 3, steps: 2 });
  const bytes = Buffer.from(await (await fetch(url.data[0].url)).arrayBuffer());
  out.url = bytes.subarray(8, 12).toString();
  out.models = (await client.models.list()).data.map((m) => m.id);
  try {
    await client.images.generate({ prompt, size: '1000x1000' });
  } catch (e) {
    out.badSize = { status: e.status, param: e.param, type: e.type };
  }
  try {
    await new OpenAI({ apiKey: 'sk-wrong', baseURL: baseURL + '/v1', maxRetries: 0 }).images.generate({ prompt });
  } catch (e) {
    out.badKey = { status: e.status, code: e.code };
  }
  console.log(JSON.stringify(out));
})();
