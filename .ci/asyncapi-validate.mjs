// Parses an AsyncAPI document with the AsyncAPI parser, resolving its
// relative file $refs (the JSON Schemas under schemas/), and fails on any
// diagnostic of error severity. Run by .ci/asyncapi, which installs the
// parser; usage: node .ci/asyncapi-validate.mjs PARSER_DIR DOCUMENT
import { createRequire } from 'node:module';
import path from 'node:path';

const [parserDir, document] = process.argv.slice(2);
if (!parserDir || !document) {
  console.error('usage: node asyncapi-validate.mjs PARSER_DIR DOCUMENT');
  process.exit(2);
}
// The parser lives in a directory of its own under target/, not in a
// node_modules beside this script, so it is loaded from there.
const require = createRequire(path.resolve(parserDir, 'package.json'));
const { Parser, fromFile, DiagnosticSeverity } = require('@asyncapi/parser');

const parser = new Parser();
// fromFile gives the parser the document's path as its source, so that
// `$ref: schemas/in/….json` resolves beside the document.
const { document: parsed, diagnostics } = await fromFile(parser, path.resolve(document)).parse();

const severityName = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'information',
  [DiagnosticSeverity.Hint]: 'hint',
};
for (const diagnostic of diagnostics) {
  const where = diagnostic.path.length > 0 ? diagnostic.path.join('/') : '(document)';
  const line = diagnostic.range ? `:${diagnostic.range.start.line + 1}` : '';
  console.log(`${severityName[diagnostic.severity]} ${diagnostic.code} at ${where}${line}: ${diagnostic.message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (errors.length > 0 || parsed === undefined) {
  console.error(`${document}: ${errors.length} error(s); the AsyncAPI parser rejects it.`);
  process.exit(1);
}
const messages = parsed.allMessages().length;
const channels = parsed.allChannels().length;
const operations = parsed.allOperations().length;
console.log(`${document}: valid AsyncAPI ${parsed.version()}, ${channels} channels, ${operations} operations, ${messages} messages, ${diagnostics.length} diagnostic(s) below error.`);
