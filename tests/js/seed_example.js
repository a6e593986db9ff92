const axios = require('axios');


const api_key = "sk-Vxe0RGICY6ViwM0pPNGapLEF886NHUNCZ05Yqgh-Vak";
const url = "http://127.0.0.1:39763/v1/stable-diffusion-3.5-turbo-txt2img";

const data = {
  "prompt": "A panda in a glowing tech-infused jacket, standing in front of a bustling cyberpunk market, his T-shirt displaying 'Segmind'. Neon lights illuminate his face, with a futuristic cityscape behind him. Reflections shimmer on the wet pavement.",
  "negative_prompt": "low quality, blurry",
  "steps": 4,
  "guidance_scale": 1,
  "seed": 98552302,
  "sampler": "dpmpp_2m",
  "scheduler": "sgm_uniform",
  "width": 1024,
  "height": 1024,
  "aspect_ratio": "custom",
  "batch_size": 1,
  "image_format": "jpeg",
  "image_quality": 95,
  "base64": false
};

(async function() {
  try {
    const response = await axios.post(url, data, { headers: { 'x-api-key': api_key } });
    console.log(response.data);
  } catch (error) {
    console.error('Error:', error.response.data);
  }
})();
