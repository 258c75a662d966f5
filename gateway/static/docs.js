// The /docs page: Swagger UI (shipped with the package) on this gateway's /openapi.json.
// The token the status page keeps (session storage) also fetches the document, so that
// it lists the endpoints that token may call; "Authorize" sets it for "Try it out".
"use strict";
(function () {
  const key = "model-gateway-token";
  const spec = new URL("openapi.json", document.baseURI).href;
  window.ui = SwaggerUIBundle({
    url: spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    tryItOutEnabled: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    requestInterceptor: function (request) {
      const token = sessionStorage.getItem(key);
      if (request.url === spec && token) {
        request.headers.Authorization = "Bearer " + token;
      }
      return request;
    },
  });
})();
