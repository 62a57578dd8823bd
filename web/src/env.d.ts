// CSS imports are bundled by esbuild into dist/app.css.
declare module "*.css";
